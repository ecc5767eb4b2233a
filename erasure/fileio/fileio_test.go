package fileio

import (
	"bytes"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

type plain struct{ r io.ReaderAt } // an io.ReaderAt that is no os.File

func (p plain) ReadAt(b []byte, off int64) (int, error) { return p.r.ReadAt(b, off) }

// TestReadAt: raw and ordinary reads return the same bytes and errors:
// whole ranges, a range crossing the end (io.EOF with the count), a
// closed file; a slow read turns raw reads off.
func TestReadAt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	data := make([]byte, 3<<20+123)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var v Valve
	old := Slow
	Slow = time.Hour // a loaded machine must not turn raw reads off here
	for _, r := range []io.ReaderAt{f, plain{f}, fdReader{f}} {
		for _, c := range []struct{ off, n int }{{0, 4096}, {5, 1 << 20}, {len(data) - 10, 10}, {len(data) - 10, 4096}, {len(data) + 5, 10}} {
			p := make([]byte, c.n)
			var n int
			var err error
			if fr, ok := r.(fdReader); ok {
				n, err = v.ReadAtFd(fr.f, fr.f.Fd(), p, int64(c.off))
			} else {
				n, err = v.ReadAt(r, p, int64(c.off))
			}
			want := max(0, min(c.n, len(data)-c.off))
			if n != want || !bytes.Equal(p[:n], data[min(c.off, len(data)):min(c.off, len(data))+n]) {
				t.Fatalf("%T [%d,+%d): %d bytes (want %d), equal %v", r, c.off, c.n, n, want, n == want)
			}
			if (n < c.n) != (err == io.EOF) || n == c.n && err != nil {
				t.Fatalf("%T [%d,+%d): err %v with %d bytes", r, c.off, c.n, err, n)
			}
		}
	}
	if !v.On() {
		t.Fatal("fast reads turned raw reads off")
	}
	// Slow reads turn raw reads off at the Strikes-th in a row; a fast
	// one in between starts the count again.
	for i, slow := range []bool{true, true, false, true, true, true} {
		if slow {
			Slow = -time.Hour
		}
		_, err = v.ReadAt(f, make([]byte, 10), 0)
		Slow = time.Hour
		if err != nil {
			t.Fatal(err)
		}
		if want := i < 5; v.On() != want {
			t.Fatalf("after read %d (slow %v): raw on %v, want %v", i, slow, v.On(), want)
		}
	}
	Slow = old
	v = Valve{}
	f.Close()
	if _, err := v.ReadAt(f, make([]byte, 10), 0); err == nil {
		t.Fatalf("read of a closed file: %v", err)
	}
}

type fdReader struct{ f *os.File } // read through ReadAtFd

func (r fdReader) ReadAt(b []byte, off int64) (int, error) { return r.f.ReadAt(b, off) }
