//! Runs kernel loops with the widest vector instructions the CPU has.
//!
//! The library is built for the baseline of its target (SSE2 on x86-64), where the
//! compiler vectorises the kernels' loops 4 floats wide. [`with_widest_simd`] detects AVX-512
//! or AVX2 at run time (once; `std` caches it) and calls the loop through a function compiled
//! with those features. The loop bodies are `#[inline(always)]` closures and helpers, so
//! they are inlined into that function and vectorised 8 or 16 wide; on other CPUs and
//! architectures the same code runs as built.

/// Calls `f` from a function compiled for the widest vector extension this CPU supports. `f`
/// (and what it calls in hot loops) must be `#[inline(always)]` to benefit.
#[inline(always)]
pub(crate) fn with_widest_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports every feature the function is compiled with.
            return unsafe { x86::avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { x86::avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_the_closure_once_and_returns_its_value() {
        let mut calls = 0;
        let v = with_widest_simd(|| {
            calls += 1;
            (0..100).map(|i| i as f32).sum::<f32>()
        });
        assert_eq!((v, calls), (4950.0, 1));
    }
}
