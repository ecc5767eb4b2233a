//go:build race

package main

// raceEnabled: under `go test -race` the e2e binaries are built with -race
// too, so real clients drive a race-checked server.
const raceEnabled = true
