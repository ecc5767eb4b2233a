package control

import (
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/raft"

	"stor.dev/stor/ctl/cluster"
)

// fsm adapts the cluster map to raft.FSM. Raft calls Apply, Snapshot and
// Restore from its FSM goroutine, one at a time; Node's readers take the
// read lock.
//
// A snapshot is the JSON encoding of the cluster.Map (cluster.Map.Marshal);
// each raft log entry of type LogCommand is one JSON cluster.Command.
type fsm struct {
	mu struct {
		sync.RWMutex
		m *cluster.Map
	}
}

// fsmResponse is what Apply returns to the proposer through the ApplyFuture.
type fsmResponse struct {
	res cluster.Result
	err error
}

func newFSM() *fsm {
	f := &fsm{}
	f.mu.m = cluster.New()
	return f
}

var _ raft.FSM = (*fsm)(nil)

func (f *fsm) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l.Type != raft.LogCommand {
		return nil
	}
	c, err := cluster.DecodeCommand(l.Data)
	if err != nil {
		// A proposer only writes what Command.Encode made; a bad entry is
		// skipped the same way on every voter.
		return fsmResponse{err: err}
	}
	res, err := f.mu.m.Apply(c)
	return fsmResponse{res: res, err: err}
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	b, err := f.mu.m.Marshal()
	if err != nil {
		return nil, fmt.Errorf("control: snapshot: %w", err)
	}
	return fsmSnapshot(b), nil
}

func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return fmt.Errorf("control: restore: %w", err)
	}
	m, err := cluster.Unmarshal(b)
	if err != nil {
		return fmt.Errorf("control: restore: %w", err)
	}
	f.mu.Lock()
	f.mu.m = m
	f.mu.Unlock()
	return nil
}

// read runs fn on the map under the read lock.
func (f *fsm) read(fn func(*cluster.Map)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.mu.m)
}

// fsmSnapshot is an encoded map; it holds no lock.
type fsmSnapshot []byte

func (s fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		sink.Cancel()
		return fmt.Errorf("control: persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s fsmSnapshot) Release() {}
