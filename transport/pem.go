package transport

import "encoding/pem"

func pemDecode(b []byte) ([]byte, []byte) {
	blk, rest := pem.Decode(b)
	if blk == nil {
		return nil, b
	}
	return blk.Bytes, rest
}
