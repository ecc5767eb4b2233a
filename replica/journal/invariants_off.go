//go:build !invariants

package journal

// invariants turns on expensive self-checks (go test -tags invariants).
const invariants = false
