// Package volume is the volume layer of a node: the volume catalog, the
// partitions each volume is split into, and the Device that routes a
// BlockDevice request to the partitions it touches, splitting requests that
// cross partition boundaries.
//
// Today every partition is local (one replica); the Manager is both the
// target.Catalog the protocol servers use and the backend of the volume API.
//
// Rules:
//   - A volume's record (name, id, number, size, block size, partition
//     size) lives in the metastore under namespace "vol" and is durable
//     (metastore Sync) before the API answers.
//   - Partition i of volume number n covers bytes [i*psize, (i+1)*psize) and
//     keeps its journal in DIR/journal/<n>-<i>; its extent map is keyed by
//     metastore.PKey(n, i). Partitions open lazily, and at start for every
//     journal directory found (recovery).
//   - vol.io is held shared by every request and exclusively by delete, so a
//     deleted volume's partitions are closed only when no request is in
//     them.
//   - One flusher goroutine runs each partition's background Flush; Close
//     joins it.
package volume

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/vfs"
	"github.com/prometheus/client_golang/prometheus"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica"
	"stor.dev/stor/target"
)

// Config of a Manager.
type Config struct {
	Dir           string
	FS            vfs.FS // nil: the real disk
	Logger        *slog.Logger
	Registerer    prometheus.Registerer // nil: no metrics
	NBDAddr       string                // shown in api.Volume as nbd://ADDR/NAME
	ISCSIAddr     string                // shown as the iSCSI portal
	SegmentSize   int64                 // journal segment size; 0: 64 MiB
	JournalBudget int64                 // see replica.Options; 0: twice the partition size
	IdleFlush     time.Duration         // see replica.Options
	FlushInterval time.Duration         // background flush period; 0: 1 s
}

type volRecord struct {
	Name          string    `json:"name"`
	ID            string    `json:"id"`
	Num           uint32    `json:"num"`
	Size          int64     `json:"size"`
	BlockSize     int       `json:"block_size"`
	PartitionSize int64     `json:"partition_size"`
	Replicas      int       `json:"replicas"`
	Created       time.Time `json:"created"`
}

type vol struct {
	m   *Manager
	rec atomic.Pointer[volRecord]
	met *volMetrics

	io      sync.RWMutex // shared by requests, exclusive by delete
	deleted bool         // REQUIRES: io

	attached atomic.Int32

	mu struct {
		sync.Mutex
		parts map[uint32]*replica.Partition
	}
}

// Manager owns a node's volumes. Safe for concurrent use.
type Manager struct {
	cfg   Config
	log   *slog.Logger
	meta  *metastore.DB
	store *erasure.Local
	met   *metrics

	// journals is read by the metastore's BeforeFlush hook.
	journals sync.Map // *replica.Partition -> struct{}

	stop chan struct{}
	wg   sync.WaitGroup

	mu struct {
		sync.Mutex
		vols    map[string]*vol
		nextNum uint32
	}
}

var _ target.Catalog = (*Manager)(nil)

// OpenManager opens the node's volumes under cfg.Dir and recovers them.
func OpenManager(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.FlushInterval == 0 {
		cfg.FlushInterval = time.Second
	}
	m := &Manager{cfg: cfg, log: cfg.Logger, stop: make(chan struct{})}
	m.mu.vols = make(map[string]*vol)
	if err := cfg.FS.MkdirAll(filepath.Join(cfg.Dir, "journal"), 0o755); err != nil {
		return nil, fmt.Errorf("volume: %w", err)
	}
	meta, err := metastore.Open(filepath.Join(cfg.Dir, "meta"), metastore.Options{FS: cfg.FS, BeforeFlush: m.syncJournals, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	m.meta = meta
	store, err := erasure.OpenLocal(cfg.FS, filepath.Join(cfg.Dir, "store"))
	if err != nil {
		meta.Close()
		return nil, err
	}
	m.store = store
	m.met = newMetrics(cfg.Registerer, m)

	if err := m.load(ctx); err != nil {
		m.closeAll()
		return nil, err
	}
	m.wg.Add(1)
	go m.flusher()
	return m, nil
}

// syncJournals is the metastore's BeforeFlush hook: no extent-map state may
// reach disk before the journal records it points at.
func (m *Manager) syncJournals() {
	m.journals.Range(func(k, _ any) bool {
		if err := k.(*replica.Partition).Sync(context.Background()); err != nil {
			m.log.Error("journal sync before metadata flush failed", "err", err)
		}
		return true
	})
}

func (m *Manager) load(ctx context.Context) error {
	var recs []volRecord
	err := m.meta.Records("vol", func(_ string, val []byte) error {
		var r volRecord
		if err := json.Unmarshal(val, &r); err != nil {
			return fmt.Errorf("volume: bad record: %w", err)
		}
		recs = append(recs, r)
		return nil
	})
	if err != nil {
		return err
	}
	if v, ok, err := m.meta.Record("node", "next-volume"); err != nil {
		return err
	} else if ok {
		n, _ := strconv.ParseUint(string(v), 10, 32)
		m.mu.nextNum = uint32(n)
	}
	byNum := make(map[uint32]*vol)
	for i := range recs {
		v := m.newVol(&recs[i])
		m.mu.vols[recs[i].Name] = v
		byNum[recs[i].Num] = v
		m.mu.nextNum = max(m.mu.nextNum, recs[i].Num+1)
	}
	// Recover every partition that has a journal.
	names, err := m.cfg.FS.List(filepath.Join(m.cfg.Dir, "journal"))
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, name := range names {
		var num, idx uint32
		if _, err := fmt.Sscanf(name, "%d-%d", &num, &idx); err != nil {
			continue
		}
		v, ok := byNum[num]
		if !ok {
			// Left over from a delete that did not finish.
			m.log.Warn("removing journal of unknown volume", "dir", name)
			m.removeAll(filepath.Join(m.cfg.Dir, "journal", name))
			continue
		}
		if _, err := v.part(ctx, idx); err != nil {
			return err
		}
	}
	for _, v := range byNum {
		m.log.Info("volume loaded", "volume", v.rec.Load().Name, "size", v.rec.Load().Size)
	}
	return nil
}

func (m *Manager) removeAll(dir string) {
	names, _ := m.cfg.FS.List(dir)
	for _, n := range names {
		m.cfg.FS.Remove(filepath.Join(dir, n))
	}
	m.cfg.FS.Remove(dir)
}

func (m *Manager) newVol(r *volRecord) *vol {
	v := &vol{m: m}
	v.rec.Store(r)
	v.mu.parts = make(map[uint32]*replica.Partition)
	v.met = m.met.forVolume(r.Name)
	return v
}

func (m *Manager) partDir(num, idx uint32) string {
	return filepath.Join(m.cfg.Dir, "journal", fmt.Sprintf("%d-%d", num, idx))
}

// part returns partition idx of v, opening it if needed.
func (v *vol) part(ctx context.Context, idx uint32) (*replica.Partition, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if p, ok := v.mu.parts[idx]; ok {
		return p, nil
	}
	rec := v.rec.Load()
	p, err := replica.OpenPartition(ctx, metastore.PKey(rec.Num, idx), v.m.meta, v.m.store, replica.Options{
		FS: v.m.cfg.FS, Dir: v.m.partDir(rec.Num, idx), SegmentSize: v.m.cfg.SegmentSize,
		JournalBudget: v.m.journalBudget(rec), IdleFlush: v.m.cfg.IdleFlush, Logger: v.m.log.With("volume", rec.Name),
	})
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", rec.Name, err)
	}
	v.mu.parts[idx] = p
	v.m.journals.Store(p, struct{}{})
	return p, nil
}

func (v *vol) partitions() []*replica.Partition {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]*replica.Partition, 0, len(v.mu.parts))
	for _, p := range v.mu.parts {
		out = append(out, p)
	}
	return out
}

// journalBudget is how much journal a partition of rec keeps before its
// flush moves data out: by default twice the partition size, so a
// partition that is rewritten again and again (its journal full of data
// that dies before it is moved) has its dead segments reclaimed without
// copying anything.
func (m *Manager) journalBudget(rec *volRecord) int64 {
	if m.cfg.JournalBudget > 0 {
		return m.cfg.JournalBudget
	}
	return 2 * rec.PartitionSize
}

func (m *Manager) flusher() {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
		}
		m.flushAll(false)
	}
}

// flushAll runs one background flush of every partition.
func (m *Manager) flushAll(force bool) {
	for _, v := range m.volumes() {
		v.io.RLock()
		if !v.deleted {
			for _, p := range v.partitions() {
				res, err := p.Flush(context.Background(), force)
				if err != nil {
					m.log.Error("flush failed", "volume", v.rec.Load().Name, "err", err)
					continue
				}
				v.met.flushed(res)
			}
		}
		v.io.RUnlock()
	}
}

func (m *Manager) volumes() []*vol {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*vol, 0, len(m.mu.vols))
	for _, v := range m.mu.vols {
		out = append(out, v)
	}
	return out
}

// Close stops background work, makes everything durable and closes.
func (m *Manager) Close() error {
	close(m.stop)
	m.wg.Wait()
	var errs []error
	for _, v := range m.volumes() {
		v.io.Lock()
		for _, p := range v.partitions() {
			errs = append(errs, p.Sync(context.Background()))
		}
		v.io.Unlock()
	}
	errs = append(errs, m.closeAll())
	return errors.Join(errs...)
}

func (m *Manager) closeAll() error {
	var errs []error
	for _, v := range m.volumes() {
		for _, p := range v.partitions() {
			errs = append(errs, p.Persist())
		}
	}
	if m.meta != nil {
		errs = append(errs, m.meta.Close()) // flushes: syncs journals first
	}
	for _, v := range m.volumes() {
		for _, p := range v.partitions() {
			m.journals.Delete(p)
			errs = append(errs, p.Close()) // persisted above: touches no metastore
		}
	}
	if m.store != nil {
		errs = append(errs, m.store.Close())
	}
	return errors.Join(errs...)
}

// Connections is the number of open Devices on every volume.
func (m *Manager) Connections() int {
	n := 0
	for _, v := range m.volumes() {
		n += int(v.attached.Load())
	}
	return n
}

// ---- the volume API backend ----

func (m *Manager) apiVolume(v *vol) api.Volume {
	r := v.rec.Load()
	out := api.Volume{
		Name: r.Name, ID: api.VolumeID(r.ID), Size: r.Size, BlockSize: r.BlockSize,
		PartitionSize: r.PartitionSize, Partitions: int((r.Size + r.PartitionSize - 1) / r.PartitionSize),
		Replicas: r.Replicas, Created: r.Created, Connections: int(v.attached.Load()),
		IQN: api.IQN(r.Name),
	}
	if _, ok, _ := m.CHAP(context.Background(), r.Name); ok {
		out.CHAP = true
	}
	for _, p := range v.partitions() {
		out.Allocated += p.Stats().Allocated
	}
	if m.cfg.NBDAddr != "" {
		out.NBD = "nbd://" + m.cfg.NBDAddr + "/" + r.Name
	}
	if m.cfg.ISCSIAddr != "" {
		out.Portals = []string{m.cfg.ISCSIAddr}
	}
	return out
}

func (m *Manager) CreateVolume(ctx context.Context, req api.CreateVolume) (api.Volume, error) {
	if err := api.CheckName(req.Name); err != nil {
		return api.Volume{}, err
	}
	if req.BlockSize == 0 {
		req.BlockSize = 512
	}
	if req.PartitionSize == 0 {
		req.PartitionSize = api.DefaultPartitionSize
	}
	if req.Replicas == 0 {
		req.Replicas = 1
	}
	bs := int64(req.BlockSize)
	switch {
	case req.BlockSize != 512 && req.BlockSize != 4096:
		return api.Volume{}, fmt.Errorf("%w: block size %d: want 512 or 4096", api.ErrInvalid, req.BlockSize)
	case req.Size <= 0 || req.Size > api.MaxVolumeSize:
		return api.Volume{}, fmt.Errorf("%w: size %d: want 1 block to %s", api.ErrInvalid, req.Size, api.FormatSize(api.MaxVolumeSize))
	case req.Size%bs != 0:
		return api.Volume{}, fmt.Errorf("%w: size %d is not a multiple of the block size %d", api.ErrInvalid, req.Size, bs)
	case req.PartitionSize < api.MinPartitionSize || req.PartitionSize%4096 != 0:
		return api.Volume{}, fmt.Errorf("%w: partition size %d: want a multiple of 4096, at least %s", api.ErrInvalid, req.PartitionSize, api.FormatSize(api.MinPartitionSize))
	case req.Replicas != 1:
		return api.Volume{}, fmt.Errorf("%w: replicas %d: a single node holds 1 replica", api.ErrInvalid, req.Replicas)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.mu.vols[req.Name]; ok {
		return api.Volume{}, fmt.Errorf("%w: volume %q", api.ErrExists, req.Name)
	}
	var idb [8]byte
	rand.Read(idb[:])
	rec := &volRecord{Name: req.Name, ID: hex.EncodeToString(idb[:]), Num: m.mu.nextNum, Size: req.Size,
		BlockSize: req.BlockSize, PartitionSize: req.PartitionSize, Replicas: req.Replicas, Created: time.Now().UTC().Truncate(time.Second)}
	if err := m.saveLocked(rec, m.mu.nextNum+1); err != nil {
		return api.Volume{}, err
	}
	m.mu.nextNum++
	v := m.newVol(rec)
	m.mu.vols[rec.Name] = v
	m.log.Info("volume created", "volume", rec.Name, "size", rec.Size, "block_size", rec.BlockSize, "partition_size", rec.PartitionSize)
	return m.apiVolume(v), nil
}

// REQUIRES: m.mu
func (m *Manager) saveLocked(rec *volRecord, nextNum uint32) error {
	b, _ := json.Marshal(rec)
	if err := m.meta.PutRecord("vol", rec.Name, b); err != nil {
		return err
	}
	if err := m.meta.PutRecord("node", "next-volume", []byte(strconv.FormatUint(uint64(nextNum), 10))); err != nil {
		return err
	}
	if err := m.meta.Sync(); err != nil {
		return fmt.Errorf("%w: saving volume %s: %v", api.ErrInternal, rec.Name, err)
	}
	return nil
}

func (m *Manager) Volumes(ctx context.Context) ([]api.Volume, error) {
	vs := m.volumes()
	out := make([]api.Volume, 0, len(vs))
	for _, v := range vs {
		out = append(out, m.apiVolume(v))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (m *Manager) lookup(name string) (*vol, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.mu.vols[name]
	if !ok {
		return nil, fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
	}
	return v, nil
}

func (m *Manager) Volume(ctx context.Context, name string) (api.Volume, error) {
	v, err := m.lookup(name)
	if err != nil {
		return api.Volume{}, err
	}
	return m.apiVolume(v), nil
}

func (m *Manager) ResizeVolume(ctx context.Context, name string, size int64) (api.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.mu.vols[name]
	if !ok {
		return api.Volume{}, fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
	}
	old := v.rec.Load()
	switch {
	case size < old.Size:
		return api.Volume{}, fmt.Errorf("%w: volume %s: shrinking from %s to %s is not supported", api.ErrInvalid, name, api.FormatSize(old.Size), api.FormatSize(size))
	case size > api.MaxVolumeSize:
		return api.Volume{}, fmt.Errorf("%w: size %d too large", api.ErrInvalid, size)
	case size%int64(old.BlockSize) != 0:
		return api.Volume{}, fmt.Errorf("%w: size %d is not a multiple of the block size %d", api.ErrInvalid, size, old.BlockSize)
	}
	rec := *old
	rec.Size = size
	if err := m.saveLocked(&rec, m.mu.nextNum); err != nil {
		return api.Volume{}, err
	}
	v.rec.Store(&rec)
	m.log.Info("volume resized", "volume", name, "from", old.Size, "to", size)
	return m.apiVolume(v), nil
}

func (m *Manager) DeleteVolume(ctx context.Context, name string, force bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.mu.vols[name]
	if !ok {
		return fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
	}
	if n := v.attached.Load(); n > 0 && !force {
		return fmt.Errorf("%w: volume %s has %d open connection(s); use --force to delete it anyway", api.ErrInUse, name, n)
	}
	v.io.Lock()
	defer v.io.Unlock()
	v.deleted = true
	rec := v.rec.Load()
	var errs []error
	for _, p := range v.partitions() {
		errs = append(errs, p.Destroy(ctx))
		m.journals.Delete(p)
		errs = append(errs, p.Close())
	}
	// Partitions never opened may still own shards or map entries.
	names, _ := m.cfg.FS.List(filepath.Join(m.cfg.Dir, "journal"))
	for _, n := range names {
		if strings.HasPrefix(n, fmt.Sprintf("%d-", rec.Num)) {
			m.removeAll(filepath.Join(m.cfg.Dir, "journal", n))
		}
	}
	errs = append(errs, m.meta.DeleteRecord("vol", name), m.meta.DeleteRecord("chap", name), m.meta.DeleteRecord("pr", name))
	errs = append(errs, m.meta.Sync())
	delete(m.mu.vols, name)
	m.met.dropVolume(name)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: deleting volume %s: %v", api.ErrInternal, name, err)
	}
	m.log.Info("volume deleted", "volume", name, "forced", force)
	return nil
}

// ---- the catalog ----

func (m *Manager) List(ctx context.Context) ([]target.Export, error) {
	vs, _ := m.Volumes(ctx)
	out := make([]target.Export, len(vs))
	for i, v := range vs {
		out[i] = target.Export{Name: v.Name, ID: string(v.ID), Description: fmt.Sprintf("stor volume %s (%s)", v.Name, api.FormatSize(v.Size))}
	}
	return out, nil
}

func (m *Manager) Open(ctx context.Context, name string) (target.Device, error) {
	v, err := m.lookup(name)
	if err != nil {
		return nil, fmt.Errorf("%w: %s", target.ErrNotFound, name)
	}
	r := v.rec.Load()
	v.attached.Add(1)
	return &Device{v: v, geo: target.Geometry{Size: r.Size, BlockSize: r.BlockSize},
		info: target.Export{Name: r.Name, ID: r.ID, Description: fmt.Sprintf("stor volume %s", r.Name)}}, nil
}
