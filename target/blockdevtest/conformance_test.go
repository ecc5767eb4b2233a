package blockdevtest

import (
	"testing"

	"stor.dev/stor/target"
)

func TestMemoryConformance(t *testing.T) {
	Run(t, func(t *testing.T, geo target.Geometry) target.BlockDevice { return NewMemory(geo) })
}

func TestFaultyPassThroughConformance(t *testing.T) {
	Run(t, func(t *testing.T, geo target.Geometry) target.BlockDevice { return NewFaulty(NewMemory(geo)) })
}
