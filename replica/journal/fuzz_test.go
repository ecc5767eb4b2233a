package journal

import (
	"bytes"
	"errors"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// FuzzOpen feeds arbitrary bytes as a segment file to Open. Open either
// refuses with ErrCorrupt or keeps a prefix that re-encodes byte for byte,
// cuts the rest, and accepts appends after it.
func FuzzOpen(f *testing.F) {
	var enc []byte
	for i, r := range []Record{
		{Kind: KindWrite, Flags: 3, Epoch: 1, OpNum: 1, Off: 4096, Len: 5, Data: []byte("hello")},
		{Kind: KindZero, Epoch: 1, OpNum: 2, Off: 0, Len: 1 << 20},
		{Kind: KindTrim, Epoch: 2, OpNum: 7, Off: 512, Len: 512, Aux: []byte{1, 2}},
		{Kind: KindMeta, Epoch: 2, OpNum: 9, Aux: []byte("extents")},
	} {
		b := make([]byte, HeaderSize+len(r.Data)+len(r.Aux))
		encodeRecord(b, &r, segTag(1))
		enc = append(enc, b...)
		f.Add(bytes.Clone(enc))
		if i == 1 {
			f.Add(append(bytes.Clone(enc), b...)) // opnum repeated
		}
	}
	f.Add(enc[:len(enc)-1])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		fs := vfs.NewMem()
		if err := fs.MkdirAll("j", 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, fs, "j/"+segName(1), data)
		j, err := Open(fs, "j", Options{})
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v", err)
			}
			return
		}
		defer j.Close()
		recs, _ := replayAll(t, j, 0)
		var again []byte
		for i := range recs {
			// In the version the input used (1 is still read).
			vers, tag := data[len(again)+6], segTag(1)
			if vers == 1 {
				tag = 0
			}
			b := make([]byte, HeaderSize+len(recs[i].Data)+len(recs[i].Aux))
			encodeHeaderVersion(b[:HeaderSize], &recs[i], vers, tag)
			copy(b[copy(b[HeaderSize:], recs[i].Data)+HeaderSize:], recs[i].Aux)
			again = append(again, b...)
		}
		size := j.Segments()[0].Size
		if int64(len(again)) != size || !bytes.Equal(again, data[:size]) {
			t.Fatalf("kept %d bytes that re-encode to %d different bytes", size, len(again))
		}
		if j.LastOpNum() == ^uint64(0) {
			return
		}
		if _, err := j.Append(&Record{Kind: KindMeta, OpNum: j.LastOpNum() + 1}); err != nil {
			t.Fatal(err)
		}
	})
}
