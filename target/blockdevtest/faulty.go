package blockdevtest

import (
	"context"
	"sync"
	"sync/atomic"

	"stor.dev/stor/target"
)

// Op names a BlockDevice operation for fault injection.
type Op uint8

const (
	OpRead Op = iota
	OpWrite
	OpWriteZeroes
	OpTrim
	OpFlush
	OpMap
	numOps
)

// Faulty wraps a BlockDevice and injects errors and stalls, for testing how
// protocol servers report device failures and drain in-flight requests.
// It implements target.Mapper; Map returns target.ErrNotSupported when the
// wrapped device has no map.
type Faulty struct {
	dev     target.BlockDevice
	entered atomic.Int64

	mu struct {
		sync.Mutex
		errs  [numOps]error
		stall chan struct{} // non-nil: operations wait until it is closed
	}
}

var _ target.BlockDevice = (*Faulty)(nil)
var _ target.Mapper = (*Faulty)(nil)

// NewFaulty wraps dev; it passes everything through until told otherwise.
func NewFaulty(dev target.BlockDevice) *Faulty { return &Faulty{dev: dev} }

// Fail makes every later op fail with err (nil heals it).
func (f *Faulty) Fail(op Op, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mu.errs[op] = err
}

// Stall makes every later operation block until release is called (or its
// context ends). release is idempotent.
func (f *Faulty) Stall() (release func()) {
	ch := make(chan struct{})
	f.mu.Lock()
	f.mu.stall = ch
	f.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			f.mu.Lock()
			if f.mu.stall == ch {
				f.mu.stall = nil
			}
			f.mu.Unlock()
			close(ch)
		})
	}
}

// Entered counts operations that have reached the device, stalled or not.
func (f *Faulty) Entered() int64 { return f.entered.Load() }

func (f *Faulty) enter(ctx context.Context, op Op) error {
	f.entered.Add(1)
	f.mu.Lock()
	err, stall := f.mu.errs[op], f.mu.stall
	f.mu.Unlock()
	if stall != nil {
		select {
		case <-stall:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return err
}

func (f *Faulty) Geometry() target.Geometry { return f.dev.Geometry() }

func (f *Faulty) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := f.enter(ctx, OpRead); err != nil {
		return err
	}
	return f.dev.ReadAt(ctx, p, off)
}

func (f *Faulty) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := f.enter(ctx, OpWrite); err != nil {
		return err
	}
	return f.dev.WriteAt(ctx, p, off, fua)
}

func (f *Faulty) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if err := f.enter(ctx, OpWriteZeroes); err != nil {
		return err
	}
	return f.dev.WriteZeroes(ctx, off, n, fua)
}

func (f *Faulty) Trim(ctx context.Context, off, n int64) error {
	if err := f.enter(ctx, OpTrim); err != nil {
		return err
	}
	return f.dev.Trim(ctx, off, n)
}

func (f *Faulty) Flush(ctx context.Context) error {
	if err := f.enter(ctx, OpFlush); err != nil {
		return err
	}
	return f.dev.Flush(ctx)
}

func (f *Faulty) Map(ctx context.Context, off, n int64) ([]target.Extent, error) {
	if err := f.enter(ctx, OpMap); err != nil {
		return nil, err
	}
	m, ok := f.dev.(target.Mapper)
	if !ok {
		return nil, target.ErrNotSupported
	}
	return m.Map(ctx, off, n)
}
