//! A small seeded random number generator whose whole state is one `u64`, so that a checkpoint
//! can store it and a resumed run draws exactly the numbers the uninterrupted run would have.

/// SplitMix64 (Steele, Lea & Flood 2014): fast, statistically sound for shuffling and dropout
/// masks, and its state is a single counter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrainRng {
    state: u64,
}

impl TrainRng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The whole state (what a checkpoint stores).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Restores a state saved by [`TrainRng::state`].
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `[0, n)` (`n > 0`), by Lemire's multiply-shift (bias < 2^-32 for
    /// the sizes used here).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// The SplitMix64 output function: a bijective 64-bit mix. Used on its own as a counter-based
/// generator (`mix64(seed ^ index)`), which lets dropout masks be drawn in parallel and still
/// be identical from run to run.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a seed for one purpose from a run seed and a few counters (step, micro-batch, layer),
/// so that every random draw in training is a pure function of where it happens.
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed ^ 0x5EED), |acc, &p| {
        mix64(acc ^ mix64(p.wrapping_add(0x1234_5678_9ABC_DEF1)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = TrainRng::new(7);
        for _ in 0..10 {
            a.next_u64();
        }
        let mut b = TrainRng::from_state(a.state());
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut v: Vec<usize> = (0..100).collect();
        TrainRng::new(1).shuffle(&mut v);
        let mut w: Vec<usize> = (0..100).collect();
        TrainRng::new(1).shuffle(&mut w);
        assert_eq!(v, w);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn uniform_mean_is_about_half() {
        let mut r = TrainRng::new(3);
        let mean = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
