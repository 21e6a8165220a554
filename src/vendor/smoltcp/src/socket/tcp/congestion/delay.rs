// hpcfed patch: a delay-based congestion controller (Vegas-like), not in smoltcp 0.12.
//
// Why: smoltcp has no SACK and recovers a loss by resending everything from the last ACK, so a
// loss costs a whole window. Through a userspace WireGuard hub whose UDP socket holds ~80
// datagrams (kernel default buffer), loss-based control (Reno, Cubic) keeps filling that queue
// until it overflows (and 0.12's Cubic resets its window to one segment every 100 ms during the
// first ~11 s). This controller reads the queue from the round-trip time instead and keeps a
// small standing queue at the bottleneck (enough to keep it busy, well below its limit, ACKs of
// the other direction included). Measured: hpcfed's benchmarks/bench_tunnel.py, and
// src/stack.rs's simulated-hub test.
//
// Per RTT sample (one per round trip, microseconds):
//   queued = cwnd * (rtt - base_rtt) / rtt          bytes this flow keeps queued
//   slow start: cwnd += acked bytes until queued exceeds GAMMA
//   then: below ALPHA grow, above BETA shrink, by half the distance to the band, at most
//         cwnd/8 (and at least one MSS) per sample, so one delayed ACK cannot collapse it
//   loss (retransmission): cwnd halves, slow start ends
// base_rtt is the minimum over the last two 10 s epochs, so a path that became slower is
// relearned within 20 s.
use crate::time::{Duration, Instant};

use super::{Controller, RttEstimator};

/// Standing queue this flow aims for, in segments (bytes = segments * MSS).
const ALPHA_SEGMENTS: usize = 20;
const BETA_SEGMENTS: usize = 40;
/// Slow start ends at a smaller queue: the window doubles per round trip, so the queue it finds
/// one round trip later is twice as long.
const GAMMA_SEGMENTS: usize = 8;
const EPOCH: Duration = Duration::from_secs(10);

#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Delay {
    cwnd: usize,
    mss: usize,
    rwnd: usize,
    slow_start: bool,
    /// Minimum RTT (µs) of the current and the previous epoch.
    min_cur: u64,
    min_prev: u64,
    epoch_start: Option<Instant>,
    /// RttEstimator sample counter last seen.
    seen: u32,
}

impl Delay {
    pub fn new() -> Delay {
        Delay {
            cwnd: 10 * 1460,
            mss: 1460,
            rwnd: 64 * 1024,
            slow_start: true,
            min_cur: u64::MAX,
            min_prev: u64::MAX,
            epoch_start: None,
            seen: 0,
        }
    }

    fn min_cwnd(&self) -> usize {
        2 * self.mss
    }

    fn base_rtt(&mut self, now: Instant, sample: u64) -> u64 {
        match self.epoch_start {
            Some(t) if now - t < EPOCH => {}
            _ => {
                self.min_prev = self.min_cur;
                self.min_cur = u64::MAX;
                self.epoch_start = Some(now);
            }
        }
        self.min_cur = self.min_cur.min(sample);
        self.min_cur.min(self.min_prev)
    }

    /// One RTT sample (µs): adjust the window towards the standing-queue band.
    fn on_sample(&mut self, now: Instant, rtt_us: u64) {
        let rtt = rtt_us.max(1);
        let base = self.base_rtt(now, rtt);
        let queued = (self.cwnd as u64 * (rtt - base) / rtt) as usize;
        let (alpha, beta) = (ALPHA_SEGMENTS * self.mss, BETA_SEGMENTS * self.mss);
        if self.slow_start {
            if queued > GAMMA_SEGMENTS * self.mss {
                self.slow_start = false;
            } else {
                return;
            }
        }
        let step_max = (self.cwnd / 8).max(self.mss);
        if queued < alpha {
            self.cwnd += ((alpha + beta) / 2 - queued).div_ceil(2).clamp(self.mss, step_max);
        } else if queued > beta {
            let down = (queued - (alpha + beta) / 2).div_ceil(2).clamp(self.mss, step_max);
            self.cwnd = self.cwnd.saturating_sub(down);
        }
        self.cwnd = self.cwnd.clamp(self.min_cwnd(), self.rwnd.max(self.min_cwnd()));
    }
}

impl Default for Delay {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller for Delay {
    fn window(&self) -> usize {
        // whole segments: a window that ends mid-segment would send a runt after every ACK
        (self.cwnd / self.mss).max(2) * self.mss
    }

    fn set_remote_window(&mut self, remote_window: usize) {
        if self.rwnd < remote_window {
            self.rwnd = remote_window;
        }
    }

    fn on_ack(&mut self, now: Instant, len: usize, rtt: &RttEstimator) {
        if rtt.samples != self.seen {
            self.seen = rtt.samples;
            self.on_sample(now, rtt.last_sample_us);
        }
        if self.slow_start {
            self.cwnd = self.cwnd.saturating_add(len).min(self.rwnd.max(self.min_cwnd()));
        }
    }

    fn on_retransmit(&mut self, _now: Instant) {
        self.slow_start = false;
        self.cwnd = (self.cwnd / 2).max(self.min_cwnd());
    }

    fn set_mss(&mut self, mss: usize) {
        self.mss = mss.max(1);
        self.cwnd = self.cwnd.max(self.min_cwnd());
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms as i64)
    }

    fn grown() -> Delay {
        let mut d = Delay::new();
        d.set_mss(1000);
        d.set_remote_window(1 << 20);
        d
    }

    #[test]
    fn slow_start_until_a_queue_shows_then_hold_the_band() {
        let mut d = grown();
        d.on_sample(at(0), 500); // base RTT 0.5 ms
        for _ in 0..200 {
            d.on_ack(at(1), 1000, &RttEstimator::default());
        }
        assert!(d.slow_start);
        let w = d.window();
        assert!(w > 200_000);
        // the RTT quadrupled: three quarters of the window are queued, far above the band
        d.on_sample(at(2), 2000);
        assert!(!d.slow_start);
        assert!(d.window() < w);
        // a queue inside the band leaves the window alone
        let w = d.cwnd as u64;
        let q = ((ALPHA_SEGMENTS + BETA_SEGMENTS) / 2 * 1000) as u64;
        d.on_sample(at(3), 500 * w / (w - q));
        assert_eq!(d.cwnd as u64, w);
    }

    #[test]
    fn no_queue_grows_and_one_late_sample_costs_at_most_an_eighth() {
        let mut d = grown();
        d.slow_start = false;
        d.cwnd = 64_000;
        d.on_sample(at(0), 500);
        assert!(d.window() > 64_000);
        let w = d.window();
        d.on_sample(at(1), 40_000); // a delayed ACK: 80x the base RTT
        assert!(d.window() >= w - w / 8);
    }

    #[test]
    fn loss_halves_and_the_window_never_drops_below_two_segments() {
        let mut d = grown();
        d.cwnd = 10_000;
        d.on_retransmit(at(0));
        assert_eq!(d.window(), 5_000);
        for _ in 0..10 {
            d.on_retransmit(at(0));
        }
        assert_eq!(d.window(), 2_000);
    }

    #[test]
    fn base_rtt_is_relearned_after_two_epochs() {
        let mut d = grown();
        assert_eq!(d.base_rtt(at(0), 500), 500);
        assert_eq!(d.base_rtt(at(11_000), 5_000), 500); // previous epoch still remembered
        assert_eq!(d.base_rtt(at(22_000), 5_000), 5_000);
    }
}
