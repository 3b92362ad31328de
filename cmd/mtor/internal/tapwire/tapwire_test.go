//go:build linux

package tapwire

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// twoNamespaces creates two network namespaces, joined to nothing.
func twoNamespaces(t *testing.T) (a, b string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no TUN/TAP here: %v", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip (apt-get install iproute2)")
	}
	id := rand.IntN(90000) + 10000
	a, b = fmt.Sprintf("mtor-tw-%d-a", id), fmt.Sprintf("mtor-tw-%d-b", id)
	for _, ns := range []string{a, b} {
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			t.Skipf("cannot create a network namespace here: %v: %s", err, out)
		}
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	return a, b
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %v: %v: %s", args, err, out)
	}
}

// udpIn opens a UDP socket bound to addr in namespace ns.
func udpIn(t *testing.T, ns, addr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := inNetns(ns, func() (err error) {
		a, err := net.ResolveUDPAddr("udp4", addr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP("udp4", a)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestWireDelaysEachWayAndKeepsOrder(t *testing.T) {
	for _, delay := range []time.Duration{0, 20 * time.Millisecond} {
		t.Run(delay.String(), func(t *testing.T) {
			nsA, nsB := twoNamespaces(t)
			w, err := New(nsA, "tapa", nsB, "tapb", delay)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			ip(t, "-n", nsA, "addr", "add", "10.99.0.1/24", "dev", "tapa")
			ip(t, "-n", nsB, "addr", "add", "10.99.0.2/24", "dev", "tapb")

			client := udpIn(t, nsA, "10.99.0.1:0")
			server := udpIn(t, nsB, "10.99.0.2:7000")
			go func() { // echo
				buf := make([]byte, 2048)
				for {
					n, from, err := server.ReadFromUDP(buf)
					if err != nil {
						return
					}
					_, _ = server.WriteToUDP(buf[:n], from)
				}
			}()
			to := &net.UDPAddr{IP: net.IPv4(10, 99, 0, 2), Port: 7000}
			buf := make([]byte, 2048)

			// One round trip first: it also resolves both ends' ARP,
			// whose frames cross the wire too.
			_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := client.WriteToUDP([]byte("hello"), to); err != nil {
				t.Fatal(err)
			}
			if _, _, err := client.ReadFromUDP(buf); err != nil {
				t.Fatalf("no echo across the wire: %v", err)
			}

			// Round trips: each crosses the wire twice.
			for i := range 3 {
				start := time.Now()
				if _, err := client.WriteToUDP([]byte{byte(i)}, to); err != nil {
					t.Fatal(err)
				}
				if _, _, err := client.ReadFromUDP(buf); err != nil {
					t.Fatal(err)
				}
				if rtt := time.Since(start); rtt < 2*delay {
					t.Fatalf("round trip %v across a wire of %v each way", rtt, delay)
				}
			}

			// A burst arrives whole and in the order sent.
			const burst = 300
			for i := range burst {
				var b [4]byte
				binary.BigEndian.PutUint32(b[:], uint32(i))
				if _, err := client.WriteToUDP(b[:], to); err != nil {
					t.Fatal(err)
				}
			}
			for i := range burst {
				n, _, err := client.ReadFromUDP(buf)
				if err != nil {
					t.Fatalf("echo %d of %d: %v", i, burst, err)
				}
				if got := binary.BigEndian.Uint32(buf[:n]); got != uint32(i) {
					t.Fatalf("echo %d came as %d-th", got, i)
				}
			}
			copied, dropped := w.Counts()
			if dropped != 0 || copied < 2*(burst+4) {
				t.Fatalf("frames copied %d, dropped %d; want at least %d and none", copied, dropped, 2*(burst+4))
			}
		})
	}
}

func TestCloseRemovesTheDevices(t *testing.T) {
	nsA, nsB := twoNamespaces(t)
	w, err := New(nsA, "tapa", nsB, "tapb", time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	ip(t, "-n", nsB, "link", "show", "tapb")
	start := time.Now()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("a second Close: %v", err)
	}
	t.Logf("Close took %v", time.Since(start))
	for _, c := range [][2]string{{nsA, "tapa"}, {nsB, "tapb"}} {
		if out, err := exec.Command("ip", "-n", c[0], "link", "show", c[1]).CombinedOutput(); err == nil {
			t.Fatalf("%s still in %s after Close: %s", c[1], c[0], out)
		}
	}
}

// TestCloseReportsACutDirection: a direction that ended before Close (its
// device failed) is reported by Close, and by a second Close.
func TestCloseReportsACutDirection(t *testing.T) {
	nsA, nsB := twoNamespaces(t)
	w, err := New(nsA, "tapa", nsB, "tapb", time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	_ = w.a.Close() // as if the device failed: a's reads end
	err = w.Close()
	if err == nil || !strings.Contains(err.Error(), "tapwire: read from") {
		t.Fatalf("Close after a direction was cut: %v, want its read's error", err)
	}
	if err2 := w.Close(); err2 == nil || err2.Error() != err.Error() {
		t.Fatalf("a second Close: %v, want %v", err2, err)
	}
	t.Log(err)
}

func TestNewRefusesADeviceOfTheSameName(t *testing.T) {
	nsA, nsB := twoNamespaces(t)
	ip(t, "-n", nsA, "tuntap", "add", "dev", "tapa", "mode", "tap")
	if w, err := New(nsA, "tapa", nsB, "tapb", 0); err == nil {
		w.Close()
		t.Fatal("a wire onto a TAP device that was already there")
	} else {
		t.Log(err)
	}
	ip(t, "-n", nsA, "link", "show", "tapa") // still the one made above
	if out, err := exec.Command("ip", "-n", nsB, "link", "show", "tapb").CombinedOutput(); err == nil {
		t.Fatalf("tapb left behind after a failed New: %s", out)
	}
}

func TestNewNamesTheMissingNamespace(t *testing.T) {
	nsA, _ := twoNamespaces(t)
	_, err := New(nsA, "tapa", "mtor-tw-no-such", "tapb", 0)
	if err == nil {
		t.Fatal("a wire to a namespace that does not exist")
	}
	if out, err2 := exec.Command("ip", "-n", nsA, "link", "show", "tapa").CombinedOutput(); err2 == nil {
		t.Fatalf("tapa left behind after a failed New: %s", out)
	}
	t.Log(err)
}
