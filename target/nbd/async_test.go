package nbd

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

// asyncDevice is a target.AsyncWriter over a BlockDevice, as a replicated
// volume's client is one: a write is applied at once and its completion
// queued, and one goroutine (the device's delivery path) runs the queued
// completions, each batch in random order, unless they are held. A held
// completion whose context ends completes with the context's error.
type asyncDevice struct {
	target.BlockDevice
	started atomic.Int64 // WriteAtAsync calls
	fail    func(off int64) error

	mu     sync.Mutex
	cond   sync.Cond
	held   bool
	closed bool
	q      []pendingWrite
	done   chan struct{}
}

type pendingWrite struct {
	ctx  context.Context
	stop func() bool // the ctx watch
	err  error
	done func(error)
}

func newAsyncDevice(t testing.TB, dev target.BlockDevice) *asyncDevice {
	d := &asyncDevice{BlockDevice: dev, done: make(chan struct{})}
	d.cond.L = &d.mu
	go d.run()
	t.Cleanup(func() {
		d.mu.Lock()
		d.closed, d.held = true, false
		d.cond.Broadcast()
		d.mu.Unlock()
		<-d.done
	})
	return d
}

func (d *asyncDevice) WriteAtAsync(ctx context.Context, p []byte, off int64, fua bool, done func(error)) {
	d.started.Add(1)
	err := d.BlockDevice.WriteAt(ctx, p, off, fua)
	if err == nil && d.fail != nil {
		err = d.fail(off)
	}
	stop := context.AfterFunc(ctx, func() {
		d.mu.Lock()
		d.cond.Broadcast()
		d.mu.Unlock()
	})
	d.mu.Lock()
	d.q = append(d.q, pendingWrite{ctx, stop, err, done})
	d.cond.Broadcast()
	d.mu.Unlock()
}

// hold holds completions until release.
func (d *asyncDevice) hold() (release func()) {
	d.mu.Lock()
	d.held = true
	d.mu.Unlock()
	return func() {
		d.mu.Lock()
		d.held = false
		d.cond.Broadcast()
		d.mu.Unlock()
	}
}

func (d *asyncDevice) run() {
	defer close(d.done)
	for {
		d.mu.Lock()
		var batch []pendingWrite
		for {
			if !d.held {
				batch, d.q = d.q, nil
			} else {
				// Held: only writes whose context ended complete.
				kept := d.q[:0]
				for _, w := range d.q {
					if err := w.ctx.Err(); err != nil {
						w.err = err
						batch = append(batch, w)
					} else {
						kept = append(kept, w)
					}
				}
				d.q = kept
			}
			if len(batch) > 0 || d.closed {
				break
			}
			d.cond.Wait()
		}
		closed := d.closed
		d.mu.Unlock()
		if closed && len(batch) == 0 {
			return
		}
		rand.Shuffle(len(batch), func(i, j int) { batch[i], batch[j] = batch[j], batch[i] })
		for _, w := range batch {
			w.stop()
			w.done(w.err)
		}
	}
}

// TestAsyncWrites: plain WRITEs to an asynchronous device are started on
// it and answered from its completions, out of order; FUA writes go the
// synchronous way; a write past the end never reaches the device; every
// write lands.
func TestAsyncWrites(t *testing.T) {
	geo := target.Geometry{Size: 4 << 20, BlockSize: 512}
	dev := newAsyncDevice(t, blockdevtest.NewMemory(geo))
	cat := newDevCatalog()
	cat.add("v", dev)
	ts := startServer(t, cat, Config{MaxInFlight: 8})
	c := connect(t, ts.addr, "v", false)
	const n = 300
	go func() {
		b := numberedWrites(n, func(i int) uint16 {
			if i%10 == 0 {
				return cmdFlagFUA
			}
			return 0
		})
		b = appendRequest(b, request{Type: cmdWrite, Cookie: n, Offset: uint64(geo.Size), Length: 4096})
		b = append(b, make([]byte, 4096)...)
		c.nc.Write(b) // errors surface as missing replies
	}()
	seen := make([]bool, n+1)
	inOrder := true
	for i := range n + 1 {
		e, cookie := c.simpleReply()
		if cookie > n || seen[cookie] {
			t.Fatalf("reply cookie %d", cookie)
		}
		seen[cookie] = true
		inOrder = inOrder && cookie == uint64(i)
		if want := map[bool]uint32{true: errnoNoSpc, false: 0}[cookie == n]; e != want {
			t.Fatalf("write %d: errno %d, want %d", cookie, e, want)
		}
	}
	if inOrder {
		t.Log("note: the replies came in request order")
	}
	if got, want := dev.started.Load(), int64(n-n/10); got != want {
		t.Fatalf("%d writes started asynchronously, want %d (the plain ones)", got, want)
	}
	checkNumbered(c, n)
}

// TestAsyncWriteErrors: a failed asynchronous write is answered with its
// error value, in a structured reply with the message.
func TestAsyncWriteErrors(t *testing.T) {
	geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
	dev := newAsyncDevice(t, blockdevtest.NewMemory(geo))
	dev.fail = func(off int64) error {
		if off == 0 {
			return fmt.Errorf("no room: %w", target.ErrNoSpace)
		}
		return fmt.Errorf("disk on fire: %w", target.ErrIO)
	}
	cat := newDevCatalog()
	cat.add("v", dev)
	ts := startServer(t, cat, Config{})
	c := connect(t, ts.addr, "v", true)
	for i, want := range []uint32{errnoNoSpc, errnoIO} {
		c.request(0, cmdWrite, uint64(i), uint64(i)*512, 512, make([]byte, 512))
		r := c.chunkOrSimple()
		if r.typ != replyError || r.errno != want || r.cookie != uint64(i) {
			t.Fatalf("write %d: %+v, want error %d", i, r, want)
		}
	}
}

// TestAsyncCompletionsNeverBlock: a client that stops reading its replies
// fills its socket and then stalls its own reader, bounded, while the
// device's one delivery goroutine goes on completing writes, so another
// connection on the same device keeps being served.
func TestAsyncCompletionsNeverBlock(t *testing.T) {
	geo := target.Geometry{Size: 64 << 20, BlockSize: 512}
	dev := newAsyncDevice(t, blockdevtest.NewMemory(geo))
	long := strings.Repeat("x", 200)
	dev.fail = func(off int64) error {
		if off < 32<<20 {
			return fmt.Errorf("%s: %w", long, target.ErrIO) // long error replies for the stuck client
		}
		return nil
	}
	cat := newDevCatalog()
	cat.add("v", dev)
	ts := startServer(t, cat, Config{})
	stuck := connect(t, ts.addr, "v", true)
	const n = 40000 // ~9 MB of error replies: more than socket buffers and maxPending
	go func() {
		b := make([]byte, 0, 1<<20)
		for i := range n {
			b = appendRequest(b, request{Type: cmdWrite, Cookie: uint64(i), Offset: uint64(i%1024) * 512, Length: 512})
			b = append(b, make([]byte, 512)...)
			if len(b) > 1<<20-1024 {
				if _, err := stuck.nc.Write(b); err != nil {
					return // closed at the end of the test
				}
				b = b[:0]
			}
		}
		stuck.nc.Write(b)
	}()
	eventually(t, 10*time.Second, "the stuck client's writes to start", func() bool { return dev.started.Load() > 1000 })
	var last int64
	eventually(t, 20*time.Second, "the stuck client's reader to stall", func() bool {
		s := dev.started.Load()
		stalled := s == last
		last = s
		time.Sleep(200 * time.Millisecond)
		return stalled
	})
	if last >= n {
		t.Fatalf("all %d writes ran while the client read no reply", n)
	}
	t.Logf("stalled after %d writes", last)

	other := connect(t, ts.addr, "v", false)
	for i := range 100 {
		data := bytes.Repeat([]byte{byte(i)}, 4096)
		other.request(0, cmdWrite, uint64(i), 32<<20+uint64(i)*4096, 4096, data)
		if e, cookie := other.simpleReply(); e != 0 || cookie != uint64(i) {
			t.Fatalf("other client's write %d: errno %d cookie %d", i, e, cookie)
		}
	}
	if got := other.readBack(false, 1000, 32<<20+99*4096, 4096); !bytes.Equal(got, bytes.Repeat([]byte{99}, 4096)) {
		t.Fatal("other client's write not applied")
	}
	stuck.nc.Close()
}

// TestAsyncDrain: Close waits for asynchronous writes in flight and sends
// their replies; a device that never completes them is given up on after
// DrainTimeout, through the context, and the writes answered ESHUTDOWN.
func TestAsyncDrain(t *testing.T) {
	for _, stuck := range []bool{false, true} {
		t.Run(fmt.Sprintf("stuck=%v", stuck), func(t *testing.T) {
			geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
			dev := newAsyncDevice(t, blockdevtest.NewMemory(geo))
			cat := newDevCatalog()
			cat.add("v", dev)
			ts := startServer(t, cat, Config{DrainTimeout: 50 * time.Millisecond})
			c := connect(t, ts.addr, "v", false)
			release := dev.hold()
			defer release()
			const n = 5
			for i := range n {
				c.request(0, cmdWrite, uint64(i), uint64(i)*512, 512, bytes.Repeat([]byte{9}, 512))
			}
			eventually(t, 10*time.Second, "writes reached the device", func() bool { return dev.started.Load() == n })
			closed := make(chan struct{})
			go func() {
				ts.Close()
				close(closed)
			}()
			eventually(t, 10*time.Second, "server closing", ts.isClosed)
			select {
			case <-closed:
				t.Fatal("Close returned with writes in flight")
			default:
			}
			want := uint32(errnoShutdown)
			if !stuck {
				release()
				want = 0
			}
			for range n {
				if e, _ := c.simpleReply(); e != want {
					t.Fatalf("in-flight write: errno %d, want %d", e, want)
				}
			}
			c.expectEOF()
			<-closed
			if n := ts.Connections(); n != 0 {
				t.Errorf("%d connections after Close", n)
			}
		})
	}
}
