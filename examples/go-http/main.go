// A Go net/http server with an in-memory counter, migrated by criu-supervisor
// with its default settings. Go 1.24 and later open listeners with Multipath
// TCP (IPPROTO_MPTCP) when the kernel has it, and CRIU cannot dump an MPTCP
// socket ("inet: Unsupported proto 262"). The supervisor's default
// CKPT_MPTCP=deny makes socket(..., IPPROTO_MPTCP) fail with EPROTONOSUPPORT,
// as on a kernel without MPTCP, and Go then listens with plain TCP.
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"runtime"
	"sync"
	"time"
)

func main() {
	var mutex sync.Mutex
	count := 0
	started := time.Now().UTC().Format(time.RFC3339Nano)
	http.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	http.HandleFunc("/count", func(w http.ResponseWriter, r *http.Request) {
		mutex.Lock()
		defer mutex.Unlock()
		if r.Method == http.MethodPost {
			count++
		}
		fmt.Fprintln(w, count)
	})
	http.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{
			"pid": os.Getpid(), "started": started, "go": runtime.Version(),
		})
	})
	address := "127.0.0.1:8080"
	log.Printf("listening on %s (%s)", address, runtime.Version())
	log.Fatal(http.ListenAndServe(address, nil))
}
