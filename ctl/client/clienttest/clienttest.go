// Package clienttest is an in-memory volume backend and an API server over
// it, for tests of the API handler, the client, storctl and anything else
// that speaks the HTTP API without a real stord.
//
// Model: Volumes keeps api.Volume records in a map under one mutex. It
// behaves as the control.Volumes contract asks: duplicate names are
// ErrExists, unknown names ErrNotFound, shrinking is ErrInvalid, deleting a
// volume with connections is ErrInUse unless forced, and exceeding Capacity
// (if set) is ErrNoSpace. FailNext injects one error into the next call.
// Times come from a fixed clock so outputs are stable.
package clienttest

import (
	"context"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/control"
)

// Epoch is the Created time of the first volume; each later one is a second
// later.
var Epoch = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

// Volumes is an in-memory control.Volumes and control.CHAPSetter.
type Volumes struct {
	mu struct {
		sync.Mutex
		capacity int64 // 0: unlimited
		vols     map[string]*entry
		created  int
		fail     error
	}
}

type entry struct {
	v    api.Volume
	chap api.SetCHAP
}

var (
	_ control.Volumes    = (*Volumes)(nil)
	_ control.CHAPSetter = (*Volumes)(nil)
)

// NewVolumes returns an empty backend with unlimited capacity.
func NewVolumes() *Volumes {
	m := &Volumes{}
	m.mu.vols = map[string]*entry{}
	return m
}

// SetCapacity limits the sum of all volume sizes; 0 is unlimited.
func (m *Volumes) SetCapacity(n int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mu.capacity = n
}

// FailNext makes the next backend call return err.
func (m *Volumes) FailNext(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mu.fail = err
}

// SetConnections sets a volume's open connection count.
func (m *Volumes) SetConnections(name string, n int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.mu.vols[name]
	if !ok {
		return notFound(name)
	}
	e.v.Connections = n
	return nil
}

// CHAP returns the credentials last set on a volume.
func (m *Volumes) CHAP(name string) (api.SetCHAP, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.mu.vols[name]
	if !ok {
		return api.SetCHAP{}, false
	}
	return e.chap, true
}

// Len is the number of volumes.
func (m *Volumes) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.mu.vols)
}

func notFound(name string) error { return fmt.Errorf("volume %q: %w", name, api.ErrNotFound) }

// failLocked returns and clears the injected error.
// REQUIRES: m.mu
func (m *Volumes) failLocked() error {
	err := m.mu.fail
	m.mu.fail = nil
	return err
}

// usedLocked is the sum of all volume sizes.
// REQUIRES: m.mu
func (m *Volumes) usedLocked() int64 {
	var n int64
	for _, e := range m.mu.vols {
		n += e.v.Size
	}
	return n
}

func (m *Volumes) CreateVolume(ctx context.Context, req api.CreateVolume) (api.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failLocked(); err != nil {
		return api.Volume{}, err
	}
	req, err := control.CheckCreateVolume(req)
	if err != nil {
		return api.Volume{}, err
	}
	if _, ok := m.mu.vols[req.Name]; ok {
		return api.Volume{}, fmt.Errorf("volume %q: %w", req.Name, api.ErrExists)
	}
	if c := m.mu.capacity; c > 0 && m.usedLocked()+req.Size > c {
		return api.Volume{}, fmt.Errorf("volume %q: %s does not fit in %s free: %w", req.Name,
			api.FormatSize(req.Size), api.FormatSize(c-m.usedLocked()), api.ErrNoSpace)
	}
	if req.Replicas == 0 {
		req.Replicas = 1
	}
	m.mu.created++
	v := api.Volume{
		Name:          req.Name,
		ID:            api.VolumeID(fmt.Sprintf("vol-%06d", m.mu.created)),
		Size:          req.Size,
		BlockSize:     req.BlockSize,
		PartitionSize: req.PartitionSize,
		Partitions:    partitions(req.Size, req.PartitionSize),
		Replicas:      req.Replicas,
		Created:       Epoch.Add(time.Duration(m.mu.created-1) * time.Second),
		NBD:           "nbd://127.0.0.1:10809/" + req.Name,
		IQN:           api.IQN(req.Name),
		Portals:       []string{"127.0.0.1:3260"},
	}
	m.mu.vols[req.Name] = &entry{v: v}
	return cloneVolume(v), nil
}

func (m *Volumes) Volumes(ctx context.Context) ([]api.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failLocked(); err != nil {
		return nil, err
	}
	vols := make([]api.Volume, 0, len(m.mu.vols))
	for _, e := range m.mu.vols {
		vols = append(vols, cloneVolume(e.v))
	}
	slices.SortFunc(vols, func(a, b api.Volume) int { return strings.Compare(a.Name, b.Name) })
	return vols, nil
}

func (m *Volumes) Volume(ctx context.Context, name string) (api.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failLocked(); err != nil {
		return api.Volume{}, err
	}
	e, ok := m.mu.vols[name]
	if !ok {
		return api.Volume{}, notFound(name)
	}
	return cloneVolume(e.v), nil
}

func (m *Volumes) ResizeVolume(ctx context.Context, name string, size int64) (api.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failLocked(); err != nil {
		return api.Volume{}, err
	}
	e, ok := m.mu.vols[name]
	if !ok {
		return api.Volume{}, notFound(name)
	}
	if err := control.CheckResize(e.v, size); err != nil {
		return api.Volume{}, err
	}
	if c := m.mu.capacity; c > 0 && m.usedLocked()-e.v.Size+size > c {
		return api.Volume{}, fmt.Errorf("volume %q: growing to %s does not fit: %w", name, api.FormatSize(size), api.ErrNoSpace)
	}
	e.v.Size = size
	e.v.Partitions = partitions(size, e.v.PartitionSize)
	return cloneVolume(e.v), nil
}

func (m *Volumes) DeleteVolume(ctx context.Context, name string, force bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failLocked(); err != nil {
		return err
	}
	e, ok := m.mu.vols[name]
	if !ok {
		return notFound(name)
	}
	if e.v.Connections > 0 && !force {
		return fmt.Errorf("volume %q has %d connections (use force): %w", name, e.v.Connections, api.ErrInUse)
	}
	delete(m.mu.vols, name)
	return nil
}

func (m *Volumes) SetCHAP(ctx context.Context, name string, req api.SetCHAP) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failLocked(); err != nil {
		return err
	}
	e, ok := m.mu.vols[name]
	if !ok {
		return notFound(name)
	}
	if err := control.CheckCHAP(req); err != nil {
		return err
	}
	e.chap = req
	e.v.CHAP = req.User != ""
	return nil
}

// Status is a status for the handler's Status hook.
func (m *Volumes) Status(ctx context.Context) (api.Status, error) {
	return api.Status{
		Node:    "node-1",
		Version: "test",
		Roles:   []string{"control", "head", "export"},
		Uptime:  "1h0m0s",
		Volumes: m.Len(),
		NBD:     "127.0.0.1:10809",
		ISCSI:   "127.0.0.1:3260",
		API:     "127.0.0.1:7480",
		Healthy: true,
	}, nil
}

func partitions(size, psize int64) int {
	if psize <= 0 {
		return 0
	}
	return int((size + psize - 1) / psize)
}

func cloneVolume(v api.Volume) api.Volume {
	v.Portals = slices.Clone(v.Portals)
	return v
}

// NewServer starts an API server over vols (NewVolumes if nil) with the real
// handler, closed when the test ends.
func NewServer(tb testing.TB, vols *Volumes) (*httptest.Server, *Volumes) {
	tb.Helper()
	if vols == nil {
		vols = NewVolumes()
	}
	srv := httptest.NewServer(control.NewHandler(control.HandlerConfig{
		Volumes: vols,
		Status:  vols.Status,
		Logger:  slog.New(slog.DiscardHandler),
	}))
	tb.Cleanup(srv.Close)
	return srv, vols
}
