// Package lazypages is the post-copy daemon: it serves the memory of a
// restored process on demand through a userfaultfd and copies the rest in
// the background.
//
//	ferry lazy-pages -D DIR          ferry restore --lazy-pages -D DIR
//	  listen lazy-pages.socket  <──── connect: "FERRYLZ1" + pid, SCM_RIGHTS uffd
//	  resolve pages of pid             (private anonymous VMAs registered in
//	  ack ─────────────────────────>    missing mode, left empty)
//	  loop:                            resume the process, exit
//	    fault at P  -> UFFDIO_COPY of P's run (up to 64 KiB), or a zero page
//	    idle        -> UFFDIO_COPY of the next 1 MiB still pending
//	    REMOVE/UNMAP-> forget those pages (never resurrect discarded data)
//	    REMAP       -> pending pages move with the mapping
//	    FORK        -> serve the child too (its own uffd, same pages pending)
//	  exit when nothing is pending (closing the uffd unregisters: pages never
//	  dumped are zero-filled by the kernel as usual)
package lazypages
