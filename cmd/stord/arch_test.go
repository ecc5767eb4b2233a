package main

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

// TestArchitecture checks the dependency rules of STYLE.md with `go list`:
// the seams stay seams. It also checks that every package has a doc comment.
func TestArchitecture(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", "stor.dev/stor/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	type pkg struct {
		ImportPath string
		Doc        string
		Name       string
		Imports    []string
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	const mod = "stor.dev/stor/"
	deps := func(p string) []string {
		out, err := exec.Command("go", "list", "-deps", p).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", p, err)
		}
		return strings.Fields(string(out))
	}
	under := func(p, dir string) bool { return p == mod+dir || strings.HasPrefix(p, mod+dir+"/") }
	for _, p := range pkgs {
		rel := strings.TrimPrefix(p.ImportPath, mod)
		if p.Doc == "" {
			t.Errorf("%s has no package doc comment", p.ImportPath)
		}
		// Transitive rules.
		for _, d := range deps(p.ImportPath) {
			switch {
			case d == p.ImportPath:
			case under(p.ImportPath, "target") && strings.HasPrefix(d, mod) && !under(d, "target"):
				t.Errorf("%s depends on %s: target/... may import only target/...", rel, d)
			case p.ImportPath == mod+"ctl/api" && strings.Contains(strings.SplitN(d, "/", 2)[0], "."):
				t.Errorf("ctl/api depends on %s: it may import only the standard library", d)
			case (under(p.ImportPath, "erasure") || under(p.ImportPath, "metastore")) && under(d, "replica"):
				t.Errorf("%s depends on %s: erasure and metastore never import replica", rel, d)
			}
		}
		// Direct-import rules.
		for _, imp := range p.Imports {
			switch {
			case strings.HasPrefix(imp, "github.com/hashicorp/raft") && p.ImportPath != mod+"ctl/control":
				t.Errorf("%s imports %s: only ctl/control may import raft", rel, imp)
			case strings.HasPrefix(imp, "github.com/cockroachdb/pebble") && !strings.HasPrefix(imp, "github.com/cockroachdb/pebble/vfs") && !under(p.ImportPath, "metastore"):
				t.Errorf("%s imports %s: only metastore may import pebble (its vfs package is fine anywhere)", rel, imp)
			}
		}
	}
}
