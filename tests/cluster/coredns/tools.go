//go:build tools

// Package tools names the program built from this module, so that `go mod tidy` keeps
// every module it needs.
package tools

import _ "github.com/coredns/coredns"
