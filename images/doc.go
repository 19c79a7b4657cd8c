// Package images reads and writes ferry's image files: the on-disk form of
// a checkpoint. The messages themselves are defined in ferry.proto
// (package pb); this package owns their framing, the file names, and the
// JSON form that "ferry show" prints.
//
// Every file starts with a 16-byte header. Record files continue with
// length-prefixed, checksummed protobuf records; pages files continue,
// from offset 4096, with raw page data, page aligned so it can be mmapped:
//
//	record file (inventory.img, core-PID.img, ...)
//
//	0          8      12      14      16
//	+----------+------+-------+-------+========================+
//	| FERRYIMG | kind | major | minor | record | record | ...  |
//	+----------+------+-------+-------+========================+
//
//	record
//
//	0       4                   8
//	+-------+-------------------+==========================+
//	|  len  | crc32c(payload)   | payload: len bytes of    |
//	|  u32  | u32 (Castagnoli)  | protobuf, len <= 256 MiB |
//	+-------+-------------------+==========================+
//
//	pages file (pages-ID.img)
//
//	0                      16                 4096
//	+----------------------+------------------+======================+
//	| header, kind = pages | zero padding     | page data ...        |
//	+----------------------+------------------+======================+
//
// All integers are little endian. A record file ends cleanly only between
// records; it has no trailer, so a file cut exactly at a record boundary
// reads as a shorter valid file, which is why files that must hold one
// record are read with ReadOne.
//
// Each kind holds one message type (see the Kind constants), except
// pagemap files: a PagemapHead, then PagemapEntry records describing, in
// order, the runs of pages stored back to back in pages-ID.img. The file
// names are built by the *Name functions and constants.
//
// Readers check the magic, the kind and the version; bound every length
// by MaxRecord before allocating; verify every checksum; and never panic
// on any input. Each problem is a *FormatError naming the file and the
// byte offset, wrapping one of the sentinel errors of errors.go. A newer
// major version is refused, telling the user to upgrade; any minor
// version of the same major is read, as minor versions only append fields
// to ferry.proto.
package images
