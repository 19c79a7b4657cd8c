// Command migrate moves a running process from one host to another:
// migrate --from hostA --to hostB PID.
//
// The cluster agents and coordinator it drives are not built yet; until
// then it says so and exits with status 2.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "migrate: live migration is not available in this build yet; use 'ferry dump' and 'ferry restore'")
	os.Exit(2)
}
