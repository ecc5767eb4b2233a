//go:build race

package replicatest

const raceEnabled = true
