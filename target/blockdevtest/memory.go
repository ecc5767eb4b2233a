// Package blockdevtest holds in-memory devices and catalogs for testing
// protocol servers, and a conformance suite any target.BlockDevice must pass.
package blockdevtest

import (
	"context"
	"sort"
	"sync"
	"sync/atomic"

	"stor.dev/stor/target"
)

// Memory is a thin in-memory target.BlockDevice: blocks never written read
// as zeros and hold no memory. It implements target.Mapper.
type Memory struct {
	geo     target.Geometry
	flushes atomic.Int64

	mu struct {
		sync.RWMutex
		blocks map[int64][]byte // block index -> data; absent = hole
		zero   map[int64]bool   // block index -> zeroed (not a hole)
	}
}

var _ target.BlockDevice = (*Memory)(nil)
var _ target.Mapper = (*Memory)(nil)

// NewMemory returns an empty device of the given geometry.
func NewMemory(geo target.Geometry) *Memory {
	m := &Memory{geo: geo}
	m.mu.blocks = make(map[int64][]byte)
	m.mu.zero = make(map[int64]bool)
	return m
}

// Flushes counts completed Flush calls.
func (m *Memory) Flushes() int64 { return m.flushes.Load() }

func (m *Memory) Geometry() target.Geometry { return m.geo }

func (m *Memory) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := m.geo.Check(off, int64(len(p))); err != nil {
		return err
	}
	bs := int64(m.geo.BlockSize)
	m.mu.RLock()
	defer m.mu.RUnlock()
	for i := int64(0); i < int64(len(p)); i += bs {
		b, ok := m.mu.blocks[(off+i)/bs]
		if ok {
			copy(p[i:i+bs], b)
		} else {
			clear(p[i : i+bs])
		}
	}
	return nil
}

func (m *Memory) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := m.geo.Check(off, int64(len(p))); err != nil {
		return err
	}
	if m.geo.ReadOnly {
		return target.ErrReadOnly
	}
	bs := int64(m.geo.BlockSize)
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := int64(0); i < int64(len(p)); i += bs {
		blk := (off + i) / bs
		m.mu.blocks[blk] = append([]byte(nil), p[i:i+bs]...)
		delete(m.mu.zero, blk)
	}
	return nil
}

func (m *Memory) discard(off, n int64, zero bool) error {
	if err := m.geo.Check(off, n); err != nil {
		return err
	}
	if m.geo.ReadOnly {
		return target.ErrReadOnly
	}
	bs := int64(m.geo.BlockSize)
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := int64(0); i < n; i += bs {
		blk := (off + i) / bs
		delete(m.mu.blocks, blk)
		if zero {
			m.mu.zero[blk] = true
		} else {
			delete(m.mu.zero, blk)
		}
	}
	return nil
}

func (m *Memory) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	return m.discard(off, n, true)
}

func (m *Memory) Trim(ctx context.Context, off, n int64) error {
	return m.discard(off, n, false)
}

func (m *Memory) Flush(ctx context.Context) error {
	m.flushes.Add(1)
	return nil
}

func (m *Memory) Map(ctx context.Context, off, n int64) ([]target.Extent, error) {
	if err := m.geo.Check(off, n); err != nil {
		return nil, err
	}
	bs := int64(m.geo.BlockSize)
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []target.Extent
	for i := int64(0); i < n; i += bs {
		blk := (off + i) / bs
		kind := target.ExtentHole
		if _, ok := m.mu.blocks[blk]; ok {
			kind = target.ExtentData
		} else if m.mu.zero[blk] {
			kind = target.ExtentZero
		}
		if l := len(out); l > 0 && out[l-1].Kind == kind {
			out[l-1].Len += bs
			continue
		}
		out = append(out, target.Extent{Off: off + i, Len: bs, Kind: kind})
	}
	return out, nil
}

// Catalog is an in-memory target.Catalog of Memory devices.
type Catalog struct {
	mu   sync.Mutex
	devs map[string]*Memory
	ids  map[string]string
	open map[string]int
}

var _ target.Catalog = (*Catalog)(nil)

// NewCatalog returns an empty catalog.
func NewCatalog() *Catalog {
	return &Catalog{devs: map[string]*Memory{}, ids: map[string]string{}, open: map[string]int{}}
}

// Add registers dev under name with the given id.
func (c *Catalog) Add(name, id string, dev *Memory) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.devs[name] = dev
	c.ids[name] = id
}

// Opened reports how many Devices of name are open.
func (c *Catalog) Opened(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.open[name]
}

func (c *Catalog) List(ctx context.Context) ([]target.Export, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []target.Export
	for name := range c.devs {
		out = append(out, target.Export{Name: name, ID: c.ids[name]})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (c *Catalog) Open(ctx context.Context, name string) (target.Device, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.devs[name]
	if !ok {
		return nil, target.ErrNotFound
	}
	c.open[name]++
	return &openDevice{Memory: d, c: c, info: target.Export{Name: name, ID: c.ids[name]}}, nil
}

type openDevice struct {
	*Memory
	c      *Catalog
	info   target.Export
	closed atomic.Bool
}

func (d *openDevice) Info() target.Export { return d.info }

func (d *openDevice) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	d.c.open[d.info.Name]--
	return nil
}
