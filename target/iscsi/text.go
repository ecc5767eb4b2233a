package iscsi

import (
	"bytes"
	"strconv"
	"strings"
)

// kv is one key=value pair of a text or login data segment (RFC 7143 6.1).
type kv struct{ k, v string }

// parseText splits NUL-separated key=value pairs. Malformed pairs (no '=')
// are returned with an empty key so that the caller can reject them.
func parseText(b []byte) []kv {
	var out []kv
	for len(b) > 0 {
		i := bytes.IndexByte(b, 0)
		var item []byte
		if i < 0 {
			item, b = b, nil
		} else {
			item, b = b[:i], b[i+1:]
		}
		if len(item) == 0 {
			continue
		}
		j := bytes.IndexByte(item, '=')
		if j < 0 {
			out = append(out, kv{"", string(item)})
			continue
		}
		out = append(out, kv{string(item[:j]), string(item[j+1:])})
	}
	return out
}

// appendText appends key=value\0.
func appendText(b []byte, k, v string) []byte {
	b = append(b, k...)
	b = append(b, '=')
	b = append(b, v...)
	return append(b, 0)
}

// params are the operational parameters of a connection (RFC 7143 13),
// holding the negotiated result or the default.
type params struct {
	headerDigest      bool
	dataDigest        bool
	maxRecvDSL        int // initiator's: our Data-In/NOP-In/Text limit
	maxBurst          int
	firstBurst        int
	initialR2T        bool
	immediateData     bool
	maxOutstandingR2T int
	maxConnections    int
	dataPDUInOrder    bool
	dataSeqInOrder    bool
}

func defaultParams() params {
	return params{
		maxRecvDSL:        8192,
		maxBurst:          262144,
		firstBurst:        65536,
		initialR2T:        true,
		immediateData:     true,
		maxOutstandingR2T: 1,
		maxConnections:    1,
		dataPDUInOrder:    true,
		dataSeqInOrder:    true,
	}
}

// Our side of the negotiation.
const (
	ourMaxRecvDSL        = 262144
	ourMaxBurst          = 16776192
	ourFirstBurst        = 16776192
	ourMaxOutstandingR2T = 16
	ourMaxConnections    = 8
	cmdWindow            = 128 // MaxCmdSN - ExpCmdSN + 1
)

// negotiate applies one operational key offered by the initiator and
// returns the answer to send ("" for declarative keys that need none).
func (p *params) negotiate(k, v string) string {
	num := func(lo, ours int, pick func(a, b int) int) (int, string) {
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > 16777215 {
			return 0, "Reject"
		}
		r := pick(n, ours)
		return r, strconv.Itoa(r)
	}
	yesNo := func(and bool, ours bool) (bool, string) {
		var in bool
		switch v {
		case "Yes":
			in = true
		case "No":
		default:
			return false, "Reject"
		}
		r := in && ours
		if !and {
			r = in || ours
		}
		if r {
			return r, "Yes"
		}
		return r, "No"
	}
	switch k {
	case "HeaderDigest", "DataDigest":
		choice := ""
		for _, o := range strings.Split(v, ",") {
			if o == "None" || o == "CRC32C" {
				choice = o
				break
			}
		}
		if choice == "" {
			return "Reject"
		}
		if k == "HeaderDigest" {
			p.headerDigest = choice == "CRC32C"
		} else {
			p.dataDigest = choice == "CRC32C"
		}
		return choice
	case "MaxRecvDataSegmentLength":
		n, err := strconv.Atoi(v)
		if err != nil || n < 512 || n > 16777215 {
			return "Reject"
		}
		p.maxRecvDSL = n
		return ""
	case "MaxBurstLength":
		n, ans := num(512, ourMaxBurst, minInt)
		if ans != "Reject" {
			p.maxBurst = n
		}
		return ans
	case "FirstBurstLength":
		n, ans := num(512, ourFirstBurst, minInt)
		if ans != "Reject" {
			p.firstBurst = n
		}
		return ans
	case "MaxOutstandingR2T":
		n, ans := num(1, ourMaxOutstandingR2T, minInt)
		if ans != "Reject" {
			p.maxOutstandingR2T = n
		}
		return ans
	case "MaxConnections":
		n, ans := num(1, ourMaxConnections, minInt)
		if ans != "Reject" {
			p.maxConnections = n
		}
		return ans
	case "InitialR2T":
		r, ans := yesNo(false, false)
		p.initialR2T = r
		return ans
	case "ImmediateData":
		r, ans := yesNo(true, true)
		p.immediateData = r
		return ans
	case "DataPDUInOrder":
		r, ans := yesNo(false, true)
		p.dataPDUInOrder = r
		return ans
	case "DataSequenceInOrder":
		r, ans := yesNo(false, true)
		p.dataSeqInOrder = r
		return ans
	case "ErrorRecoveryLevel":
		if _, err := strconv.Atoi(v); err != nil {
			return "Reject"
		}
		return "0"
	case "DefaultTime2Wait":
		_, ans := num(0, 2, maxInt)
		return ans
	case "DefaultTime2Retain":
		_, ans := num(0, 0, minInt)
		return ans
	case "IFMarker", "OFMarker":
		return "No"
	case "IFMarkInt", "OFMarkInt":
		return "Irrelevant"
	case "iSCSIProtocolLevel":
		return "1"
	case "TaskReporting":
		return "RFC3720"
	case "InitiatorName", "InitiatorAlias", "TargetName", "SessionType", "TargetAlias", "TargetAddress", "TargetPortalGroupTag":
		return ""
	}
	return "NotUnderstood"
}

func minInt(a, b int) int { return min(a, b) }
func maxInt(a, b int) int { return max(a, b) }
