// Command storctl manages the volumes of a stor cluster through its HTTP
// API; see package ctl/cli for the commands and exit codes.
package main

import (
	"os"

	"stor.dev/stor/ctl/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
