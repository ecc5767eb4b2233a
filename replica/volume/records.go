package volume

import (
	"context"
	"encoding/json"
	"fmt"

	"stor.dev/stor/ctl/api"
)

// SetCHAP stores the iSCSI CHAP credentials of a volume (an empty User
// removes them). They are kept in the metastore so a restart keeps them,
// and are never returned by the API.
func (m *Manager) SetCHAP(ctx context.Context, name string, req api.SetCHAP) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.mu.vols[name]; !ok {
		return fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
	}
	var err error
	if req.User == "" {
		err = m.meta.DeleteRecord("chap", name)
	} else {
		b, _ := json.Marshal(req)
		err = m.meta.PutRecord("chap", name, b)
	}
	if err == nil {
		err = m.meta.Sync()
	}
	if err != nil {
		return fmt.Errorf("%w: saving CHAP of %s: %v", api.ErrInternal, name, err)
	}
	m.log.Info("volume CHAP set", "volume", name, "enabled", req.User != "", "mutual", req.MutualUser != "")
	return nil
}

// CHAP returns the CHAP credentials of a volume, if it has any.
func (m *Manager) CHAP(ctx context.Context, name string) (api.SetCHAP, bool, error) {
	b, ok, err := m.meta.Record("chap", name)
	if err != nil || !ok {
		return api.SetCHAP{}, false, err
	}
	var c api.SetCHAP
	if err := json.Unmarshal(b, &c); err != nil {
		return api.SetCHAP{}, false, fmt.Errorf("volume: CHAP record of %s: %w", name, err)
	}
	return c, true, nil
}

// LoadPR returns the saved SCSI persistent-reservation state of a volume.
func (m *Manager) LoadPR(ctx context.Context, name string) ([]byte, error) {
	b, _, err := m.meta.Record("pr", name)
	return b, err
}

// SavePR durably replaces the persistent-reservation state of a volume.
func (m *Manager) SavePR(ctx context.Context, name string, state []byte) error {
	if err := m.meta.PutRecord("pr", name, state); err != nil {
		return err
	}
	return m.meta.Sync()
}
