// Package images reads and writes ferry's image files.
//
// Every file starts with a 16-byte header; record files continue with
// length-prefixed, checksummed protobuf records; page files continue, from
// offset 4096, with raw page data that can be mmapped:
//
//	record file (inventory.img, core-PID.img, ...)
//	+----------+------+-------+-------+=========================+
//	| FERRYIMG | kind | major | minor | record, record, ...      |
//	|  8 bytes | u32  |  u16  |  u16  |                          |
//	+----------+------+-------+-------+=========================+
//	record: | len u32 | crc32c(payload) u32 | payload (protobuf) |
//
//	page file (pages-ID.img)
//	+--------- header ---------+-- zero padding --+================+
//	| FERRYIMG | kind | ver    |   to offset 4096 | page data ...   |
//	+--------------------------+------------------+================+
//
// All integers are little endian. Readers check magic, kind and version,
// bound every length before allocating, verify every checksum, and report
// problems as *FormatError naming the file and byte offset. A newer major
// version is refused; a newer minor version is read (fields are only ever
// appended to the schemas, see ferry.proto).
package images
