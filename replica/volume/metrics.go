package volume

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"stor.dev/stor/replica"
)

type opKind int

const (
	opRead opKind = iota
	opWrite
	opZero
	opTrim
	opFlush
	opMap
	numOps
)

var opNames = [numOps]string{"read", "write", "write_zeroes", "trim", "flush", "block_status"}

// metrics are a Manager's Prometheus metrics. With a nil Registerer they
// are still counted, just not exported.
type metrics struct {
	ops      *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	errs     *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	inflight *prometheus.GaugeVec
	flushed  *prometheus.CounterVec
}

// volMetrics are one volume's handles, resolved once so the I/O path does
// no label lookups.
type volMetrics struct {
	ops      [numOps]prometheus.Counter
	bytes    [numOps]prometheus.Counter
	errs     [numOps]prometheus.Counter
	latency  [numOps]prometheus.Observer
	inflight prometheus.Gauge
	moved    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, m *Manager) *metrics {
	x := &metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stor_volume_ops_total",
			Help: "Requests served, by volume and operation."}, []string{"volume", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stor_volume_bytes_total",
			Help: "Bytes covered by requests, by volume and operation."}, []string{"volume", "op"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stor_volume_errors_total",
			Help: "Requests that failed, by volume and operation."}, []string{"volume", "op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "stor_volume_op_duration_seconds",
			Help:    "Request latency inside the volume layer.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2.5, 12)}, []string{"volume", "op"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "stor_volume_inflight_requests",
			Help: "Requests in progress."}, []string{"volume"}),
		flushed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stor_volume_flushed_bytes_total",
			Help: "Bytes moved from journals to the long-term store."}, []string{"volume"}),
	}
	if reg != nil {
		reg.MustRegister(x.ops, x.bytes, x.errs, x.latency, x.inflight, x.flushed, &partCollector{m: m})
	}
	return x
}

func (x *metrics) forVolume(name string) *volMetrics {
	v := &volMetrics{inflight: x.inflight.WithLabelValues(name), moved: x.flushed.WithLabelValues(name)}
	for op := opKind(0); op < numOps; op++ {
		v.ops[op] = x.ops.WithLabelValues(name, opNames[op])
		v.bytes[op] = x.bytes.WithLabelValues(name, opNames[op])
		v.errs[op] = x.errs.WithLabelValues(name, opNames[op])
		v.latency[op] = x.latency.WithLabelValues(name, opNames[op])
	}
	return v
}

func (x *metrics) dropVolume(name string) {
	for _, vec := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{x.ops, x.bytes, x.errs, x.latency, x.inflight, x.flushed} {
		vec.DeletePartialMatch(prometheus.Labels{"volume": name})
	}
}

func (v *volMetrics) begin() { v.inflight.Inc() }

func (v *volMetrics) end(op opKind, n int64, start time.Time, err error) {
	v.inflight.Dec()
	v.ops[op].Inc()
	v.bytes[op].Add(float64(n))
	v.latency[op].Observe(time.Since(start).Seconds())
	if err != nil {
		v.errs[op].Inc()
	}
}

func (v *volMetrics) flushed(r replica.FlushResult) { v.moved.Add(float64(r.Moved)) }

// partCollector reports per-partition state at scrape time.
type partCollector struct{ m *Manager }

var (
	descJournal = prometheus.NewDesc("stor_partition_journal_bytes", "Bytes in the partition's journal segments.", []string{"volume", "partition"}, nil)
	descLag     = prometheus.NewDesc("stor_partition_flush_lag_ops", "Ops whose data is still only in the journal.", []string{"volume", "partition"}, nil)
	descExtents = prometheus.NewDesc("stor_partition_extents", "Extents in the partition's extent map.", []string{"volume", "partition"}, nil)
	descAlloc   = prometheus.NewDesc("stor_partition_allocated_bytes", "Bytes of data the partition references.", []string{"volume", "partition"}, nil)
	descConns   = prometheus.NewDesc("stor_volume_attachments", "Open NBD/iSCSI attachments of the volume.", []string{"volume"}, nil)
)

func (c *partCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descJournal
	ch <- descLag
	ch <- descExtents
	ch <- descAlloc
	ch <- descConns
}

func (c *partCollector) Collect(ch chan<- prometheus.Metric) {
	for _, v := range c.m.volumes() {
		name := v.rec.Load().Name
		ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(v.attached.Load()), name)
		v.mu.Lock()
		for idx, p := range v.mu.parts {
			s := p.Stats()
			i := fmt.Sprint(idx)
			ch <- prometheus.MustNewConstMetric(descJournal, prometheus.GaugeValue, float64(s.JournalBytes), name, i)
			ch <- prometheus.MustNewConstMetric(descLag, prometheus.GaugeValue, float64(s.FlushLag), name, i)
			ch <- prometheus.MustNewConstMetric(descExtents, prometheus.GaugeValue, float64(s.Extents), name, i)
			ch <- prometheus.MustNewConstMetric(descAlloc, prometheus.GaugeValue, float64(s.Allocated), name, i)
		}
		v.mu.Unlock()
	}
}
