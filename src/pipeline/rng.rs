//! Seeded Gaussian noise that reproduces `torch.randn(..., generator=
//! torch.Generator("cpu").manual_seed(seed))` for float32, so a seed gives the
//! same initial latents as diffusers. It is also our default generator: it is
//! plain integer MT19937 plus libm, so it is deterministic across runs and
//! platforms (to the last-ulp differences of `sin`/`cos`/`log`).
//!
//! How torch draws float32 normals on the CPU (ATen's `normal_fill`):
//! - tensors of 16 or more elements: fill every element with a uniform float
//!   `(u32 & 0xFFFFFF) * 2^-24`, then transform each block of 16 in place with
//!   Box-Muller (`u1 = 1 - x[j]`, `u2 = x[j + 8]`, `r = sqrt(-2 ln u1)`,
//!   `x[j] = r cos(2 pi u2)`, `x[j + 8] = r sin(2 pi u2)` for j in 0..8); when the
//!   length is not a multiple of 16, the last 16 elements are redrawn and
//!   transformed again;
//! - fewer than 16 elements: one double-precision Box-Muller draw per element
//!   from 53-bit uniforms, caching the second value of each pair.

use crate::error::Result;
use crate::memory;

/// The 32-bit Mersenne Twister (MT19937), seeded as `std::mt19937(seed)`.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Two draws, the first as the high word (torch's `random64`).
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// A seeded normal generator with torch-CPU semantics.
#[derive(Clone)]
pub struct TorchRng {
    mt: Mt19937,
    cached_normal: Option<f64>,
}

impl TorchRng {
    pub fn new(seed: u64) -> Self {
        TorchRng {
            mt: Mt19937::new(seed),
            cached_normal: None,
        }
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.mt.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// A uniform integer in `0..n` (`n > 0`) by rejection, so every value
    /// is equally likely. Not torch's `randint` stream: the trainer's own.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n.max(1) as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.mt.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// `n` standard normal float32 values, as one `torch.randn(n)` call.
    /// For sizes the caller has bounded; a job's latents use [`Self::try_randn`].
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        self.try_randn(n, "noise").unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::randn`] into a fallibly allocated buffer (`what` names it in
    /// the `OutOfMemory` error).
    pub fn try_randn(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        if n < 16 {
            return Ok((0..n).map(|_| self.normal_f64() as f32).collect());
        }
        let mut data = memory::collect(n, (0..n).map(|_| self.uniform_f32()), what)?;
        for block in 0..n / 16 {
            box_muller_16(&mut data[block * 16..block * 16 + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for v in &mut data[tail..] {
                *v = self.uniform_f32();
            }
            box_muller_16(&mut data[tail..]);
        }
        Ok(data)
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

fn box_muller_16(x: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - x[j];
        let u2 = x[j + 8];
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        x[j] = r * theta.cos();
        x[j + 8] = r * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard_sequence() {
        // The C++ standard requires the 10000th draw of a default-seeded
        // (5489) std::mt19937 to be 4123659995.
        let mut mt = Mt19937::new(5489);
        let v = (0..10000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(v, 4_123_659_995);
    }
}
