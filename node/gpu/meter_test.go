package gpu

import (
	"math"
	"sync"
	"testing"
)

// fakeCounter is a fake GPU total-energy counter (no GPU here): it returns
// whatever the test last set.
type fakeCounter struct {
	mu    sync.Mutex
	value uint64
	fail  bool
	reads int
}

func (c *fakeCounter) read() (uint64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reads++
	return c.value, !c.fail
}

func (c *fakeCounter) set(v uint64, fail bool) {
	c.mu.Lock()
	c.value, c.fail = v, fail
	c.mu.Unlock()
}

// step is one event of a scenario: set the counter, then begin or end a query.
type step struct {
	counter uint64
	fail    bool   // the reading at this event fails
	begin   string // query to begin
	end     string // query to end
	wantMJ  uint64 // for end
	wantOK  bool   // for end
}

func begin(counter uint64, q string) step { return step{counter: counter, begin: q} }
func end(counter uint64, q string, mj uint64) step {
	return step{counter: counter, end: q, wantMJ: mj, wantOK: true}
}
func endUnknown(counter uint64, q string) step { return step{counter: counter, end: q} }

func TestMeterApportioning(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"alone gets the whole delta", []step{
			begin(1000, "A"), end(1600, "A", 600),
		}},
		{"idle energy belongs to no query", []step{
			begin(0, "A"), end(100, "A", 100),
			begin(900, "B"), end(1000, "B", 100),
		}},
		{"two fully overlapping get half each", []step{
			begin(0, "A"), begin(0, "B"), end(1000, "A", 500), end(1000, "B", 500),
		}},
		{"staggered overlap", []step{
			// [0,100] A alone: 100; [100,300] A+B: 100 each; [300,700] B alone: 400.
			begin(0, "A"), begin(100, "B"), end(300, "A", 200), end(700, "B", 500),
		}},
		{"nested", []step{
			// [0,200] A: 200; [200,600] A+B: 200 each; [600,1000] A: 400.
			begin(0, "A"), begin(200, "B"), end(600, "B", 200), end(1000, "A", 800),
		}},
		{"three staggered", []step{
			// A: 300 + 150 + 100; B: 150 + 100 + 150; C: 100 + 150 + 300.
			begin(0, "A"), begin(300, "B"), begin(600, "C"),
			end(900, "A", 550), end(1200, "B", 400), end(1500, "C", 550),
		}},
		{"thirds are rounded", []step{
			begin(0, "A"), begin(0, "B"), begin(0, "C"),
			end(100, "A", 33), end(100, "B", 33), end(100, "C", 33),
		}},
		{"failed reading taints the queries in flight only", []step{
			begin(0, "A"),
			{counter: 0, fail: true, begin: "B"}, // A's interval unknown; B has no baseline
			begin(500, "C"),                      // [fail,500] unknown: A, B tainted; C starts clean
			end(800, "C", 100),                   // [500,800] A+B+C: 100 each
			endUnknown(900, "A"),
			endUnknown(900, "B"),
			begin(1000, "D"), end(1250, "D", 250), // later queries are measured again
		}},
		{"failed reading at the end", []step{
			begin(0, "A"), {counter: 0, fail: true, end: "A"},
			begin(50, "B"), end(80, "B", 30),
		}},
		{"counter going backwards (driver reload)", []step{
			begin(5000, "A"), endUnknown(20, "A"),
			begin(40, "B"), end(90, "B", 50),
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &fakeCounter{}
			m := NewMeter(c.read)
			toks := map[string]Token{}
			for i, s := range tc.steps {
				c.set(s.counter, s.fail)
				if s.begin != "" {
					toks[s.begin] = m.Begin()
					continue
				}
				mj, ok := m.End(toks[s.end])
				if mj != s.wantMJ || ok != s.wantOK {
					t.Fatalf("step %d: End(%s) = %d, %v; want %d, %v", i, s.end, mj, ok, s.wantMJ, s.wantOK)
				}
			}
			if m.Active() != 0 {
				t.Fatalf("%d queries still active", m.Active())
			}
		})
	}
}

func TestMeterTokens(t *testing.T) {
	c := &fakeCounter{}
	m := NewMeter(c.read, WithMaxActive(1))
	a := m.Begin()
	c.set(70, false)
	if b := m.Begin(); b != (Token{}) {
		t.Fatal("Begin beyond the bound returned a tracked token")
	} else if _, ok := m.End(b); ok {
		t.Fatal("untracked token measured")
	}
	if mj, ok := m.End(a); !ok || mj != 70 {
		t.Fatalf("End = %d, %v", mj, ok)
	}
	if _, ok := m.End(a); ok {
		t.Fatal("second End of the same token measured")
	}
	if _, ok := m.End(Token{}); ok {
		t.Fatal("zero token measured")
	}

	// No counter at all: nothing is measured, nothing panics.
	for _, nm := range []*Meter{NewMeter(nil), nil} {
		tok := nm.Begin()
		if _, ok := nm.End(tok); ok {
			t.Fatal("meter without a counter measured energy")
		}
	}
	// A counter that never works.
	dead := &fakeCounter{fail: true}
	dm := NewMeter(dead.read)
	tok := dm.Begin()
	if _, ok := dm.End(tok); ok {
		t.Fatal("failed counter measured energy")
	}
}

// TestMeterConcurrent checks, under the race detector, that concurrent
// queries share out exactly what the counter advanced while they ran.
func TestMeterConcurrent(t *testing.T) {
	c := &fakeCounter{}
	// The counter advances by 7 mJ at every reading.
	src := func() (uint64, bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.value += 7
		c.reads++
		return c.value, true
	}
	m := NewMeter(src)
	holder := m.Begin() // keeps the GPU "busy" throughout, so no energy is idle
	start := c.value
	const workers, each = 8, 200
	var mu sync.Mutex
	var total uint64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				tok := m.Begin()
				mj, ok := m.End(tok)
				if !ok {
					t.Error("query not measured")
					return
				}
				mu.Lock()
				total += mj
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	hmj, ok := m.End(holder)
	if !ok {
		t.Fatal("holder not measured")
	}
	total += hmj
	consumed := c.value - start
	// Each query's share is rounded once: the sum is exact within 0.5 mJ per query.
	if diff := math.Abs(float64(total) - float64(consumed)); diff > 0.5*(workers*each+1) {
		t.Fatalf("shares add up to %d mJ, the counter advanced %d mJ", total, consumed)
	}
	if m.Active() != 0 {
		t.Fatalf("%d active", m.Active())
	}
}
