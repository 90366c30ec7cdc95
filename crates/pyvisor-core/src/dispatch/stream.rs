//! The parent's side of one stream's flow control: the credit it granted its worker, the items
//! it holds for its caller, and the checks on every item the worker sends.
//!
//! Owns [`StreamFlow`] (shared by the worker's reader, which counts items in, and the caller,
//! which counts them out and grants credit back) and [`StreamSink`] (the reader's end, kept in
//! the worker's call table). The credit is the bound: a worker may have at most `window`
//! items unacknowledged, so the items buffered for a caller never exceed the window however
//! slowly it reads; an item past the credit, or out of sequence, is a protocol violation.
//!
//! Does not send frames (the caller writes `credit` through the slot's writer), decode items,
//! or decide what a crash means for the stream (`pool::stream`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::outcome::Outcome;

/// What the reader hands a stream's caller, in the order the worker sent it.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    /// One item's encoded value.
    Item(Bytes),
    /// The stream ended: its reply, or the worker's death, or the pool's shutdown.
    End(Outcome),
}

/// One stream's credit and buffer counters, shared by its worker's reader and its caller.
#[derive(Debug)]
pub(crate) struct StreamFlow {
    /// The credit window: items the worker may send before the caller grants more.
    window: u64,
    /// Credit granted in all, the first window included (the caller adds to it before it
    /// writes a `credit` frame, so the reader never sees an item the grant allowed before it
    /// counted the grant).
    granted: AtomicU64,
    /// Items received from the worker and not yet taken by the caller.
    buffered: AtomicUsize,
    /// The most items ever buffered at once.
    peak: AtomicUsize,
}

impl StreamFlow {
    pub(crate) fn new(window: u32) -> Arc<Self> {
        let window = u64::from(window.max(1));
        Arc::new(StreamFlow { window, granted: AtomicU64::new(window), buffered: AtomicUsize::new(0), peak: AtomicUsize::new(0) })
    }

    /// The credit window.
    pub(crate) fn window(&self) -> u64 {
        self.window
    }

    /// Items buffered for the caller now.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// The most items ever buffered at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// The caller took an item.
    pub(crate) fn taken(&self) {
        let _ = self.buffered.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(1)));
    }

    /// A new attempt starts from the window again: `received` items of earlier attempts are
    /// forgotten (the reader's count restarts with the new sink).
    pub(crate) fn restart(&self) {
        self.granted.store(self.window, Ordering::Release);
    }

    /// Grant `n` more items (before writing the `credit` frame).
    pub(crate) fn grant(&self, n: u64) {
        self.granted.fetch_add(n, Ordering::AcqRel);
    }

    fn arrived(&self) {
        let now = self.buffered.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }
}

/// The caller's side of the grants: counts taken items and says when to grant them back
/// (every half window, so that the worker never waits while the caller keeps up, and is
/// told in batches rather than per item).
#[derive(Debug, Default)]
pub(crate) struct Grants {
    owed: u64,
}

impl Grants {
    /// An item was taken; returns how much credit to grant now, if any.
    pub(crate) fn taken(&mut self, window: u64) -> Option<u64> {
        self.owed += 1;
        if self.owed >= (window / 2).max(1) {
            Some(std::mem::take(&mut self.owed))
        } else {
            None
        }
    }
}

/// The reader's end of a stream, kept in the worker's call table.
pub(crate) struct StreamSink {
    tx: mpsc::UnboundedSender<StreamEvent>,
    flow: Arc<StreamFlow>,
    /// Items received for this attempt (the next `seq` expected).
    received: u64,
}

impl StreamSink {
    /// A sink feeding `tx`, under `flow`'s credit; the caller keeps the receiver.
    pub(crate) fn new(flow: Arc<StreamFlow>) -> (Self, mpsc::UnboundedReceiver<StreamEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (StreamSink { tx, flow, received: 0 }, rx)
    }

    /// Item `seq` arrived with `value`: checked against the sequence and the credit, then
    /// handed to the caller. An error names the violation (the worker must be killed).
    pub(crate) fn item(&mut self, seq: u64, value: Bytes) -> Result<(), String> {
        if seq != self.received {
            return Err(format!("stream item {seq} arrived where item {} was due", self.received));
        }
        let granted = self.flow.granted.load(Ordering::Acquire);
        if self.received >= granted {
            return Err(format!("stream item {seq} sent without credit (credit granted: {granted} items)"));
        }
        self.received += 1;
        self.flow.arrived();
        // A caller that went away meanwhile drops the item; the buffer count does not matter
        // then.
        let _ = self.tx.send(StreamEvent::Item(value));
        Ok(())
    }

    /// Items received for this attempt.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// The stream ended with `outcome`.
    pub(crate) fn end(self, outcome: Outcome) {
        let _ = self.tx.send(StreamEvent::End(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: u64) -> Bytes {
        Bytes::from(rmp_serde::to_vec(&i).expect("encodes"))
    }

    #[test]
    fn items_past_the_credit_or_out_of_order_are_violations() {
        let flow = StreamFlow::new(3);
        let (mut sink, mut rx) = StreamSink::new(Arc::clone(&flow));
        for i in 0..3 {
            sink.item(i, value(i)).expect("within the credit");
        }
        assert_eq!((flow.buffered(), flow.peak()), (3, 3));
        let over = sink.item(3, value(3)).expect_err("past the credit");
        assert!(over.contains("without credit"), "{over}");
        // The caller takes two and grants them back: two more fit, a third does not.
        for _ in 0..2 {
            assert!(matches!(rx.try_recv(), Ok(StreamEvent::Item(_))));
            flow.taken();
        }
        flow.grant(2);
        sink.item(3, value(3)).expect("granted");
        sink.item(4, value(4)).expect("granted");
        assert!(sink.item(5, value(5)).is_err());
        assert_eq!((flow.buffered(), flow.peak()), (3, 3));
        let skipped = sink.item(7, value(7)).expect_err("out of order");
        assert!(skipped.contains("item 5 was due"), "{skipped}");
        assert_eq!(sink.received(), 5);
    }

    #[test]
    fn grants_go_back_every_half_window_and_the_buffer_never_exceeds_it() {
        // A model run: a worker that sends whenever it has credit, a caller that takes one
        // item every third step; the buffer stays within the window and nothing stalls.
        for window in [1u32, 2, 3, 8, 255] {
            let flow = StreamFlow::new(window);
            let (mut sink, mut rx) = StreamSink::new(Arc::clone(&flow));
            let mut grants = Grants::default();
            let (mut sent, mut worker_credit, mut taken, mut held_back) = (0u64, u64::from(window), 0u64, 0u64);
            for step in 0..10_000u64 {
                held_back += u64::from(worker_credit == 0);
                if worker_credit > 0 {
                    sink.item(sent, value(sent)).expect("the worker keeps to its credit");
                    sent += 1;
                    worker_credit -= 1;
                }
                if step % 3 == 0 {
                    if let Ok(StreamEvent::Item(v)) = rx.try_recv() {
                        assert_eq!(rmp_serde::from_slice::<u64>(&v).expect("decodes"), taken);
                        taken += 1;
                        flow.taken();
                        if let Some(n) = grants.taken(flow.window()) {
                            flow.grant(n);
                            worker_credit += n;
                        }
                    }
                }
                assert!(flow.buffered() as u64 <= u64::from(window));
            }
            assert!(taken > 3000, "window {window}: only {taken} items taken");
            assert!(flow.peak() as u64 <= u64::from(window));
            assert!(held_back > 1000, "window {window}: the faster worker was held back only {held_back} times");
        }
    }

    #[test]
    fn the_end_follows_the_items() {
        let (mut sink, mut rx) = StreamSink::new(StreamFlow::new(2));
        sink.item(0, value(0)).expect("credit");
        sink.end(Outcome { result: Ok(crate::buffers::Reply::in_band(value(1))), span: None, started: None });
        assert!(matches!(rx.try_recv(), Ok(StreamEvent::Item(_))));
        assert!(matches!(rx.try_recv(), Ok(StreamEvent::End(_))));
    }
}
