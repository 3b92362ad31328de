package receipt

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func key(t testing.TB) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, id
}

func answer() (*pb.QueryRequest, []*pb.Event, *pb.Done) {
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo"}
	req.Id[0] = 7
	evs := []*pb.Event{
		{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "Hel"}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "lo"}}},
		{Kind: &pb.Event_Embedding{Embedding: &pb.Embedding{Index: 1, Vector: []float32{0.5, -1}}}},
		{Kind: &pb.Event_Media{Media: &pb.Media{Mime: "image/png", Data: []byte{1, 2, 3}}}},
		{Kind: &pb.Event_ToolCall{ToolCall: &pb.ToolCallDelta{Index: 0, Id: "c1", Name: "f", Arguments: "{}"}}},
	}
	done := &pb.Done{Usage: &pb.Usage{PromptTokens: 5, CompletionTokens: 2},
		Timing: &pb.Timing{TtftMs: 30, TotalMs: 41}, EnergyMj: 900, Model: "demo"}
	return req, evs, done
}

func hashOf(evs []*pb.Event) []byte {
	h := NewOutputHash()
	for _, ev := range evs {
		h.Add(ev)
	}
	return h.Sum()
}

// signed is a receipt signed by a worker key and countersigned by a router key.
func signed(t testing.TB) (*pb.Receipt, Expect, crypto.PrivKey) {
	t.Helper()
	wk, wid := key(t)
	rk, rid := key(t)
	req, evs, done := answer()
	out := hashOf(evs)
	r := New(req, done, out, wid, rid, time.UnixMilli(1767225600000))
	if err := Sign(r, wk); err != nil {
		t.Fatal(err)
	}
	e := Expect{Request: req, Done: done, Output: out, Worker: wid, Requester: rid}
	if err := Check(r, e); err != nil {
		t.Fatalf("check of an honest receipt: %v", err)
	}
	if err := Countersign(r, rk); err != nil {
		t.Fatal(err)
	}
	return r, e, rk
}

// asSent is r as its worker sent it: a copy without the
// countersignature.
func asSent(r *pb.Receipt) *pb.Receipt {
	if r == nil {
		return nil
	}
	c := proto.CloneOf(r)
	c.RouterSig, c.RouterBatch = nil, nil
	return c
}

func TestReceiptRoundTrip(t *testing.T) {
	r, _, _ := signed(t)
	if err := Verify(r); err != nil {
		t.Fatalf("verify: %v", err)
	}
	// What travels on the wire verifies after decoding.
	b, err := proto.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back pb.Receipt
	if err := proto.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if err := Verify(&back); err != nil {
		t.Fatalf("verify after the wire: %v", err)
	}
}

func TestReceiptTampered(t *testing.T) {
	_, otherID := key(t)
	cases := []struct {
		name   string
		tamper func(r *pb.Receipt, e *Expect)
		want   error // from Check
		verify error // from Verify of the countersigned receipt, nil = not run
	}{
		{"more tokens", func(r *pb.Receipt, e *Expect) { r.CompletionTokens++; e.Done.Usage.CompletionTokens++ }, ErrBadSig, ErrBadSig},
		{"more energy", func(r *pb.Receipt, e *Expect) { r.EnergyMj *= 2; e.Done.EnergyMj *= 2 }, ErrBadSig, ErrBadSig},
		{"other output", func(r *pb.Receipt, e *Expect) { e.Output = make([]byte, sha256.Size) }, ErrOutputHash, nil},
		{"other query", func(r *pb.Receipt, e *Expect) { e.Request.Id = make([]byte, 16) }, ErrMismatch, nil},
		{"other worker", func(r *pb.Receipt, e *Expect) { e.Worker = otherID }, ErrMismatch, nil},
		{"other requester", func(r *pb.Receipt, e *Expect) { e.Requester = otherID }, ErrMismatch, nil},
		{"done differs", func(r *pb.Receipt, e *Expect) { e.Done.Timing.TotalMs++ }, ErrMismatch, nil},
		{"router sig stripped", func(r *pb.Receipt, e *Expect) { r.RouterSig = nil }, nil, ErrNoRouterSig},
		{"router sig of another receipt", func(r *pb.Receipt, e *Expect) { r.TimeUnixMs++; r.WorkerSig[0] ^= 1 }, ErrBadSig, ErrBadSig},
		{"short hash", func(r *pb.Receipt, e *Expect) { r.OutputSha256 = r.OutputSha256[:5] }, ErrMalformed, ErrMalformed},
		{"no receipt", nil, ErrMalformed, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, e, _ := signed(t)
			if tc.tamper == nil {
				r = nil
			} else {
				tc.tamper(r, &e)
			}
			if err := Check(asSent(r), e); !errors.Is(err, tc.want) {
				t.Errorf("Check = %v, want %v", err, tc.want)
			}
			if tc.verify != nil {
				if err := Verify(r); !errors.Is(err, tc.verify) {
					t.Errorf("Verify = %v, want %v", err, tc.verify)
				}
			}
		})
	}
}

// A worker signature cannot be replayed as a router signature: the domain
// prefixes differ.
func TestReceiptDomainSeparation(t *testing.T) {
	wk, wid := key(t)
	req, evs, done := answer()
	r := New(req, done, hashOf(evs), wid, wid, time.Now())
	if err := Sign(r, wk); err != nil {
		t.Fatal(err)
	}
	r.RouterSig = r.WorkerSig
	if err := Verify(r); !errors.Is(err, ErrBadSig) {
		t.Fatalf("worker signature accepted as router signature: %v", err)
	}
}

// Unknown fields (a newer peer's) are not part of what is signed, so they
// neither break nor forge a signature.
func TestReceiptUnknownFieldsIgnored(t *testing.T) {
	r, _, _ := signed(t)
	b, _ := proto.Marshal(r)
	b = append(b, 0xf8, 0x07, 0x01) // field 127, varint 1
	var back pb.Receipt
	if err := proto.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if err := Verify(&back); err != nil {
		t.Fatalf("verify with an unknown field: %v", err)
	}
}

func TestOutputHashOrderAndContent(t *testing.T) {
	_, evs, _ := answer()
	base := hashOf(evs)
	swapped := append([]*pb.Event{evs[0], evs[2], evs[1]}, evs[3:]...)
	if string(hashOf(swapped)) == string(base) {
		t.Error("reordered chunks hash the same")
	}
	// "Hel"+"lo" vs "He"+"llo": records keep chunk boundaries apart.
	split := []*pb.Event{{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "He"}}}, {Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "llo"}}}}
	if string(hashOf(split)) == string(hashOf(evs[1:3])) {
		t.Error("differently split chunks hash the same")
	}
	// Heartbeats and logprobs are not output.
	with := append([]*pb.Event{{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: 3}}}}, evs...)
	if string(hashOf(with)) != string(base) {
		t.Error("an Accepted event changed the output hash")
	}
}

// TestOutputHashVector pins the hash of a fixed answer so that the
// definition in docs/protocol.md cannot drift.
func TestOutputHashVector(t *testing.T) {
	evs := []*pb.Event{{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "Hel"}}}, {Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "lo"}}}}
	want := sha256.Sum256([]byte{1, 3, 'H', 'e', 'l', 1, 2, 'l', 'o'})
	if got := hashOf(evs); string(got) != string(want[:]) {
		t.Fatalf("hash = %x, want %x", got, want)
	}
}

// TestDocStatesTheSigningRules keeps docs/protocol.md §6.4 true to the
// code: the domain prefixes and the bytes of the output hash example.
func TestDocStatesTheSigningRules(t *testing.T) {
	raw, err := os.ReadFile("../../docs/protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := strings.Join(strings.Fields(string(raw)), " ")
	example := []byte{1, 3, 'H', 'e', 'l', 1, 2, 'l', 'o'} // TestOutputHashVector's
	var hexes []string
	for _, b := range example {
		hexes = append(hexes, fmt.Sprintf("%02x", b))
	}
	for _, want := range []string{
		fmt.Sprintf("hashes the %d bytes `%s`", len(example), strings.Join(hexes, " ")),
		fmt.Sprintf("`%q` (%d ASCII bytes)", WorkerDomain, len(WorkerDomain)),
		fmt.Sprintf("`%q`", RouterDomain),
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("docs/protocol.md does not say %s", want)
		}
	}
}

// FuzzVerify: any bytes a peer sends as a receipt are refused or verified,
// never a panic.
func FuzzVerify(f *testing.F) {
	r, _, _ := signed(f)
	b, _ := proto.Marshal(r)
	f.Add(b)
	f.Add([]byte{0x52, 0x02, 0x00, 0x24})
	f.Fuzz(func(t *testing.T, data []byte) {
		var r pb.Receipt
		if proto.Unmarshal(data, &r) != nil {
			return
		}
		_ = Verify(&r)
		_ = VerifyWorker(&r)
	})
}

// SignedHere (a node's own worker, in this process) skips only the
// verification of the worker's signature: every other check still holds.
func TestCheckSignedHere(t *testing.T) {
	cases := []struct {
		name   string
		tamper func(r *pb.Receipt, e *Expect)
		want   error
	}{
		{"as signed", func(*pb.Receipt, *Expect) {}, nil},
		{"signature not verified", func(r *pb.Receipt, e *Expect) { r.WorkerSig[0] ^= 1 }, nil},
		{"other output", func(r *pb.Receipt, e *Expect) { e.Output = make([]byte, sha256.Size) }, ErrOutputHash},
		{"done differs", func(r *pb.Receipt, e *Expect) { e.Done.Timing.TotalMs++ }, ErrMismatch},
		{"short hash", func(r *pb.Receipt, e *Expect) { r.OutputSha256 = r.OutputSha256[:5] }, ErrMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, e, _ := signed(t)
			r.RouterSig = nil
			tc.tamper(r, &e)
			e.SignedHere = true
			if err := Check(r, e); !errors.Is(err, tc.want) {
				t.Errorf("Check = %v, want %v", err, tc.want)
			}
		})
	}
	r, e, _ := signed(t)
	r.RouterSig = nil
	r.WorkerSig[0] ^= 1
	if err := Check(r, e); !errors.Is(err, ErrBadSig) {
		t.Errorf("Check of a bad signature without SignedHere = %v, want %v", err, ErrBadSig)
	}
}

// TestCheckRefusesImplausibleFigures: a worker signs what it likes; what
// the routing node saw of the answer (its time, its output) bounds the
// figures it countersigns (Plausible, then Check, as settle runs them). An honest receipt passes at the bounds' edge.
func TestCheckRefusesImplausibleFigures(t *testing.T) {
	wk, wid := key(t)
	_, rid := key(t)
	// The answer took 50 ms, with 5 bytes of text in 2 chunks, for a
	// request of 40 bytes.
	obs := &Observed{Ms: 50, OutputBytes: 5, Outputs: 2, RequestBytes: 40}
	for _, tc := range []struct {
		name string
		set  func(d *pb.Done, req *pb.QueryRequest)
		want error
	}{
		{"honest", func(*pb.Done, *pb.QueryRequest) {}, nil},
		{"its clock a second ahead", func(d *pb.Done, _ *pb.QueryRequest) { d.Timing.TotalMs = 1050 }, nil},
		{"longer than the answer took", func(d *pb.Done, _ *pb.QueryRequest) { d.Timing.TotalMs = 4_000_000_000 }, ErrImplausible},
		{"first output after its end", func(d *pb.Done, _ *pb.QueryRequest) { d.Timing.TtftMs = 45; d.Timing.TotalMs = 40 }, ErrImplausible},
		{"hidden thinking at 10 000 tokens a second", func(d *pb.Done, _ *pb.QueryRequest) { d.Usage.CompletionTokens = 5 + 2 + 64 + 500 }, nil},
		{"more tokens than output and time allow", func(d *pb.Done, _ *pb.QueryRequest) { d.Usage.CompletionTokens = 4_000_000_000 }, ErrImplausible},
		{"more prompt tokens than the request holds", func(d *pb.Done, _ *pb.QueryRequest) { d.Usage.PromptTokens = 4_000_000_000 }, ErrImplausible},
		{"20 kW", func(d *pb.Done, _ *pb.QueryRequest) { d.EnergyMj = (41 + 1000) * MaxPowerW }, nil},
		{"a meter's step on a short answer", func(d *pb.Done, _ *pb.QueryRequest) { d.Timing.TtftMs = 2; d.Timing.TotalMs = 3; d.EnergyMj = 112_000 }, nil},
		{"more energy than any worker draws", func(d *pb.Done, _ *pb.QueryRequest) { d.EnergyMj = 1 << 62 }, ErrImplausible},
		{"another model than asked", func(d *pb.Done, _ *pb.QueryRequest) { d.Model = "gpt-5-ultra" }, ErrMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, evs, done := answer()
			tc.set(done, req)
			out := hashOf(evs)
			r := New(req, done, out, wid, rid, time.UnixMilli(1767225600000))
			if err := Sign(r, wk); err != nil {
				t.Fatal(err)
			}
			// As the routing node settles: the Done's figures against
			// what it saw, then the receipt (whose figures equal them).
			err := Plausible(done, obs)
			if err == nil {
				err = Check(r, Expect{Request: req, Done: done, Output: out, Worker: wid, Requester: rid})
			}
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("Plausible, then Check = %v, want %v", err, tc.want)
			}
		})
	}
}
