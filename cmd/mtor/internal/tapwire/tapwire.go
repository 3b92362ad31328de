//go:build linux

// Package tapwire joins two network namespaces with a cable of a given
// latency, for tests: a TAP device in each namespace, and this process
// copying every Ethernet frame from one to the other after a fixed delay.
// The test machine's kernel has no netem, and a veth pair has no latency
// at all, which no path between two volunteers has: a hole punch's
// timing, for one, depends on it.
package tapwire

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxQueued bounds the frames in flight each way, as a router's buffer
// does: a frame beyond it is dropped.
const maxQueued = 4096

// frameMax is the largest frame a TAP device hands over without offloads
// (IFF_VNET_HDR unset): an MTU of 1500 and the Ethernet header, with room
// for a larger MTU.
const frameMax = 1 << 16

// Wire is a delayed cable between two TAP devices.
type Wire struct {
	a, b    *os.File
	delay   time.Duration
	done    chan struct{} // closed by Close: queued frames are dropped
	close   sync.Once
	closeEr error
	wg      sync.WaitGroup
	mu      sync.Mutex
	dropped int
	copied  int
	// ioErrs: reads that failed before Close, each of which ended its
	// direction, and each direction's first failed write (at most 4).
	ioErrs []error
}

// New creates TAP device ifA in namespace nsA and ifB in nsB (names as
// under /var/run/netns, as `ip netns add` makes them), sets both up, and
// copies frames between them each way after delay. Close removes them.
func New(nsA, ifA, nsB, ifB string, delay time.Duration) (*Wire, error) {
	a, err := openTAP(nsA, ifA)
	if err != nil {
		return nil, err
	}
	b, err := openTAP(nsB, ifB)
	if err != nil {
		a.Close()
		return nil, err
	}
	w := &Wire{a: a, b: b, delay: delay, done: make(chan struct{})}
	w.wg.Add(2)
	go w.pipe(a, b)
	go w.pipe(b, a)
	return w, nil
}

// Close ends the copying, drops the frames in flight and removes both
// devices (a TAP device without TUNSETPERSIST goes with its last
// descriptor). Its error includes a read or write that failed before it,
// which had cut a direction: a test that used the cable learns that its
// network was not what it built. Later calls return the first one's
// error.
func (w *Wire) Close() error {
	w.close.Do(func() {
		close(w.done)
		err := errors.Join(w.a.Close(), w.b.Close())
		w.wg.Wait()
		w.mu.Lock()
		w.closeEr = errors.Join(append(w.ioErrs, err)...)
		w.mu.Unlock()
	})
	return w.closeEr
}

// failed notes err, of a read or write, unless Close caused it.
func (w *Wire) failed(err error) {
	select {
	case <-w.done:
		return
	default:
	}
	w.mu.Lock()
	w.ioErrs = append(w.ioErrs, err)
	w.mu.Unlock()
}

// Counts reports the frames copied and those dropped because a
// direction's queue was full.
func (w *Wire) Counts() (copied, dropped int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.copied, w.dropped
}

type frame struct {
	due time.Time
	b   []byte
}

// pipe reads frames from src and writes each to dst delay after it was
// read, in order: one reader, one writer and a bounded queue between.
func (w *Wire) pipe(src, dst *os.File) {
	defer w.wg.Done()
	q := make(chan frame, maxQueued)
	done := make(chan struct{})
	go func() {
		defer close(done)
		writeFailed := false
		// One timer for every frame (Reset leaves no stale fire since
		// Go 1.23).
		t := time.NewTimer(time.Hour)
		defer t.Stop()
		for f := range q {
			if d := time.Until(f.due); d > 0 {
				t.Reset(d)
				select {
				case <-t.C:
				case <-w.done:
					continue // drain the queue, write nothing
				}
			}
			if _, err := dst.Write(f.b); err != nil {
				if !writeFailed {
					writeFailed = true
					w.failed(fmt.Errorf("tapwire: write to %s: %w", dst.Name(), err))
				}
			} else {
				w.count(&w.copied)
			}
		}
	}()
	buf := make([]byte, frameMax)
	for {
		n, err := src.Read(buf)
		if err != nil {
			w.failed(fmt.Errorf("tapwire: read from %s: %w", src.Name(), err))
			break
		}
		f := frame{due: time.Now().Add(w.delay), b: append([]byte(nil), buf[:n]...)}
		select {
		case q <- f:
		default:
			w.count(&w.dropped)
		}
	}
	close(q)
	<-done
}

func (w *Wire) count(n *int) {
	w.mu.Lock()
	*n++
	w.mu.Unlock()
}

// openTAP creates TAP device name in namespace ns and sets it up. The
// device belongs to the namespace of the thread that opens
// /dev/net/tun.
func openTAP(ns, name string) (*os.File, error) {
	if len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tapwire: device name %q too long", name)
	}
	var f *os.File
	err := inNetns(ns, func() (err error) {
		f, err = createTAP(name)
		return err
	})
	if err != nil && f != nil {
		// Made, but the thread could not go back: not handed out.
		f.Close()
		return nil, err
	}
	return f, err
}

// inNetns runs fn on a thread of its own moved into namespace ns: what fn
// creates there (a device, a socket) stays in ns.
func inNetns(ns string, fn func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is not unlocked unless it went back to its own
		// namespace: otherwise it ends with this goroutine instead of
		// serving others in the wrong one.
		restored, err := runIn(ns, fn)
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- err
	}()
	return <-ch
}

func runIn(ns string, fn func() error) (restored bool, err error) {
	self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		return true, fmt.Errorf("tapwire: own namespace: %w", err)
	}
	defer self.Close()
	target, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		return true, fmt.Errorf("tapwire: namespace %s: %w", ns, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return true, fmt.Errorf("tapwire: enter %s: %w", ns, err)
	}
	err = fn()
	if errBack := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); errBack != nil {
		return false, errors.Join(err, fmt.Errorf("tapwire: back from %s: %w", ns, errBack))
	}
	return true, err
}

// createTAP opens a TAP device in the calling thread's namespace and sets
// it up.
func createTAP(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tapwire: open /dev/net/tun: %w", err)
	}
	req, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tapwire: %s: %w", name, err)
	}
	// IFF_TUN_EXCL: a device of that name already there is an error,
	// not one to attach to (and leave behind on Close).
	req.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_TUN_EXCL)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, req); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("tapwire: create %s: a device of that name exists: %w", name, err)
		}
		return nil, fmt.Errorf("tapwire: create %s: %w", name, err)
	}
	if err := setUp(name); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// Non-blocking, so that the runtime's poller serves reads and Close
	// ends a pending one.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tapwire: %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// setUp sets interface name up in the calling thread's namespace.
func setUp(name string) error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("tapwire: socket: %w", err)
	}
	defer unix.Close(s)
	req, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("tapwire: %s: %w", name, err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, req); err != nil {
		return fmt.Errorf("tapwire: flags of %s: %w", name, err)
	}
	req.SetUint16(req.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, req); err != nil {
		return fmt.Errorf("tapwire: set %s up: %w", name, err)
	}
	return nil
}
