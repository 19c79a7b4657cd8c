// Package transport carries ferry's page streams: TCP, optionally wrapped
// in mutually authenticated TLS (CA, certificate, key, CRL), with a
// versioned hello and framed messages, zstd-compressed when both sides
// agree.
//
//	client                                   server
//	hello: "FERRYTP1" ver u16 flags u16 ──>
//	                                    <── hello: "FERRYTP1" ver u16 flags u16
//	frames (zstd stream if both set FlagZstd):
//	  type u8 | len u32 LE | payload
//
// A peer whose certificate does not chain to the configured CA, or is on
// the CRL, is refused during the TLS handshake with an error naming why.
package transport
