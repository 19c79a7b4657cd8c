// Package pageserver receives a dump's page data over the network
// (ferry page-server) and writes it as image files, exactly as the dump
// would have written them locally.
//
//	dump / pre-dump (Client)                 page-server (Serve)
//	  transport hello (TLS, zstd) ────────>  accept one session
//	  OPEN "pages-42.img"                    create DIR/pages-42.img
//	  DATA ... DATA                          append
//	  CLOSE                                  close
//	  OPEN "pagemap-42.img" ... CLOSE
//	  END                          <──────── ACK ("" or the error)
//
// File names are plain names inside DIR; anything else is refused.
package pageserver
