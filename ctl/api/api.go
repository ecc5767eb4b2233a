// Package api is the shared vocabulary of stor: identifiers, the JSON bodies
// of the HTTP API, and the errors it answers with. It imports only the
// standard library so that every package, and outside tools, may use it.
//
// HTTP API (JSON bodies; errors as {"error": "...", "code": "..."}):
//
//	GET    /v1/status                  -> Status
//	GET    /v1/volumes                 -> []Volume
//	POST   /v1/volumes                 CreateVolume -> Volume (201)
//	GET    /v1/volumes/{name}          -> Volume
//	POST   /v1/volumes/{name}/resize   ResizeVolume -> Volume
//	DELETE /v1/volumes/{name}?force=1  -> 204
//	POST   /v1/volumes/{name}/chap     SetCHAP -> 204 (secrets are never answered back)
//	GET    /metrics                    Prometheus text format
package api

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Named numbers.
type (
	NodeID      string
	VolumeID    string
	PartitionID uint32 // index of a partition within its volume, in LBA order
	Epoch       uint64
	OpNum       uint64
)

// Errors the API answers with; the client maps codes back to these.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrInvalid  = errors.New("invalid argument")
	ErrInUse    = errors.New("in use")
	ErrNoSpace  = errors.New("no space")
	ErrInternal = errors.New("internal error")
)

// Codes pairs each error with its wire code and HTTP status.
var Codes = []struct {
	Err    error
	Code   string
	Status int
}{
	{ErrNotFound, "not_found", 404},
	{ErrExists, "exists", 409},
	{ErrInvalid, "invalid", 400},
	{ErrInUse, "in_use", 409},
	{ErrNoSpace, "no_space", 507},
	{ErrInternal, "internal", 500},
}

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Volume as the API shows it.
type Volume struct {
	Name          string    `json:"name"`
	ID            VolumeID  `json:"id"`
	Size          int64     `json:"size"`
	BlockSize     int       `json:"block_size"`
	PartitionSize int64     `json:"partition_size"`
	Partitions    int       `json:"partition_count"`
	Replicas      int       `json:"replicas"`
	Created       time.Time `json:"created"`
	Connections   int       `json:"connections"`   // open NBD/iSCSI attachments on this node
	Allocated     int64     `json:"allocated"`     // bytes holding data (thin)
	NBD           string    `json:"nbd,omitempty"` // nbd://host:port/name
	IQN           string    `json:"iqn,omitempty"`
	Portals       []string  `json:"portals,omitempty"`
	CHAP          bool      `json:"chap,omitempty"` // iSCSI logins need CHAP (see SetCHAP)
}

// CreateVolume is the body of POST /v1/volumes. Zero fields take defaults:
// BlockSize 512, PartitionSize 1 GiB, Replicas 1 on a single node.
type CreateVolume struct {
	Name          string `json:"name"`
	Size          int64  `json:"size"`
	BlockSize     int    `json:"block_size,omitempty"`
	PartitionSize int64  `json:"partition_size,omitempty"`
	Replicas      int    `json:"replicas,omitempty"`
}

// ResizeVolume is the body of POST /v1/volumes/{name}/resize.
type ResizeVolume struct {
	Size int64 `json:"size"`
}

// SetCHAP is the body of POST /v1/volumes/{name}/chap: the iSCSI CHAP
// credentials of the volume's target. An empty User turns CHAP off; mutual
// CHAP (the target proves itself to the initiator) is optional. Secrets are
// write-only: no answer and no log line carries them.
type SetCHAP struct {
	User         string `json:"user"`
	Secret       string `json:"secret"`
	MutualUser   string `json:"mutual_user,omitempty"`
	MutualSecret string `json:"mutual_secret,omitempty"`
}

// Status is the answer of GET /v1/status.
type Status struct {
	Node      NodeID   `json:"node"`
	Version   string   `json:"version"`
	Roles     []string `json:"roles"`
	Uptime    string   `json:"uptime"`
	Volumes   int      `json:"volumes"`
	NBD       string   `json:"nbd,omitempty"`
	ISCSI     string   `json:"iscsi,omitempty"`
	API       string   `json:"api"`
	Healthy   bool     `json:"healthy"`
	DataDir   string   `json:"data_dir,omitempty"`
	Connected int      `json:"connections"`
}

// ReplicaStatus is one partition replica a head node holds: the answer of
// GET /v1/replicas on that node is a list of them, by volume and partition.
type ReplicaStatus struct {
	Volume    string       `json:"volume"`
	Partition PartitionID  `json:"partition"`
	Role      string       `json:"role"` // primary or secondary (as the replica sees itself)
	Epoch     Epoch        `json:"epoch"`
	Primary   NodeID       `json:"primary,omitempty"` // the primary it knows of
	Commit    OpNum        `json:"commit"`            // commit index
	Applied   OpNum        `json:"applied"`
	Last      OpNum        `json:"last"` // last op in its log (notes included)
	Solo      bool         `json:"solo,omitempty"`
	Peers     []PeerStatus `json:"peers,omitempty"` // on a primary
	Error     string       `json:"error,omitempty"` // the failure that stopped it
}

// PeerStatus is a primary's view of one peer: it holds the primary's log up
// to Match (of the primary's Last: its rebuild progress).
type PeerStatus struct {
	Node         NodeID `json:"node"`
	Match        OpNum  `json:"match"`
	InSync       bool   `json:"in_sync"`
	NeedSnapshot bool   `json:"need_snapshot,omitempty"`
}

// Limits on volumes.
const (
	DefaultPartitionSize = 1 << 30
	MinPartitionSize     = 1 << 20
	MaxVolumeSize        = 1 << 50 // 1 PiB
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// CheckName reports whether s is a valid volume name: 1-63 characters of
// a-z, 0-9, '.', '_', '-', starting with a letter or digit. Names end up in
// IQNs and NBD export names, so the set is small on purpose.
func CheckName(s string) error {
	if !nameRE.MatchString(s) {
		return fmt.Errorf("%w: volume name %q: use 1-63 of a-z 0-9 . _ - starting with a letter or digit", ErrInvalid, s)
	}
	return nil
}

// ParseSize parses sizes such as 512, 4096, 10M, 1G, 1GiB, 2T, 1.5G.
// Suffixes are binary (K=1024) with or without "iB"/"B".
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("%w: empty size", ErrInvalid)
	}
	u := strings.ToUpper(t)
	u = strings.TrimSuffix(u, "IB")
	u = strings.TrimSuffix(u, "B")
	mult := int64(1)
	if n := len(u); n > 0 {
		switch u[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		case 'P':
			mult = 1 << 50
		}
		if mult != 1 {
			u = u[:n-1]
		}
	}
	if u == "" {
		return 0, fmt.Errorf("%w: size %q: no number", ErrInvalid, s)
	}
	if i, err := strconv.ParseInt(u, 10, 64); err == nil {
		if i < 0 || (mult > 1 && i > (1<<62)/mult) {
			return 0, fmt.Errorf("%w: size %q out of range", ErrInvalid, s)
		}
		return i * mult, nil
	}
	f, err := strconv.ParseFloat(u, 64)
	if err != nil || f < 0 || f*float64(mult) > float64(int64(1)<<62) {
		return 0, fmt.Errorf("%w: size %q: want a number with an optional K, M, G, T suffix (e.g. 10G)", ErrInvalid, s)
	}
	return int64(f * float64(mult)), nil
}

// FormatSize prints n in the largest binary unit that keeps it exact, else
// with one decimal: 1GiB, 512MiB, 1.5GiB, 4096B.
func FormatSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	i := 0
	v := float64(n)
	for i < len(units)-1 && v >= 1024 {
		v /= 1024
		i++
	}
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d%s", int64(v), units[i])
	}
	return fmt.Sprintf("%.1f%s", v, units[i])
}

// IQN is the iSCSI target name of a volume.
func IQN(volume string) string { return "iqn.2026-11.dev.stor:" + volume }
