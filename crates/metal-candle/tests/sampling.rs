//! The sampling chain, tested statistically: filters never let a token outside their set
//! through, frequencies follow the softmax, temperature → 0 is greedy, seeds repeat, and the
//! penalties push logits the right way whatever their sign.

use metal_candle::generate::{Sampler, SamplingConfig, Step};

/// Deterministic pseudo-random logits (xorshift), spread over about [-4, 4].
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32
        })
        .collect()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
    let mut c = vec![0; logits.len()];
    for _ in 0..draws {
        c[sampler.sample(logits, &[]).unwrap() as usize] += 1;
    }
    c
}

fn ln(p: &[f64]) -> Vec<f32> {
    p.iter().map(|x| x.ln() as f32).collect()
}

#[test]
fn top_k_never_leaves_the_k_largest_and_reaches_all_of_them() {
    for seed in 0..5 {
        let x = logits(64, seed);
        let mut sorted: Vec<(usize, f32)> = x.iter().copied().enumerate().collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
        let allowed: Vec<usize> = sorted[..5].iter().map(|p| p.0).collect();
        let cfg = SamplingConfig {
            temperature: 4.0,
            top_k: Some(5),
            seed,
            ..Default::default()
        };
        let c = counts(&mut cfg.sampler().unwrap(), &x, 4000);
        for (tok, &n) in c.iter().enumerate() {
            if allowed.contains(&tok) {
                assert!(n > 0, "seed {seed}: allowed token {tok} never drawn: {c:?}");
            } else {
                assert_eq!(
                    n, 0,
                    "seed {seed}: token {tok} is outside the top 5 {allowed:?}"
                );
            }
        }
    }
}

#[test]
fn top_p_keeps_the_smallest_nucleus_and_renormalises() {
    // Probabilities 0.5, 0.3, 0.15, 0.05: p = 0.75 needs the first two tokens.
    let x = ln(&[0.5, 0.3, 0.15, 0.05]);
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: Some(0.75),
        seed: 3,
        ..Default::default()
    };
    let draws = 20_000;
    let c = counts(&mut cfg.sampler().unwrap(), &x, draws);
    assert_eq!(
        c[2] + c[3],
        0,
        "tokens outside the nucleus were drawn: {c:?}"
    );
    // Within the nucleus: 0.5 / 0.8 = 0.625; 5 standard deviations is about 0.017.
    let share = c[0] as f64 / draws as f64;
    assert!(
        (share - 0.625).abs() < 0.017,
        "share of token 0 = {share}, expected 0.625"
    );
}

#[test]
fn top_p_always_keeps_the_top_token() {
    let x = ln(&[0.9, 0.05, 0.05]);
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: Some(0.01),
        seed: 1,
        ..Default::default()
    };
    let c = counts(&mut cfg.sampler().unwrap(), &x, 500);
    assert_eq!(c, vec![500, 0, 0]);
}

#[test]
fn min_p_drops_tokens_below_the_scaled_top_probability() {
    // 0.2 × 0.5 = 0.1: token 3 (0.05) goes, token 2 (0.15) stays.
    let x = ln(&[0.5, 0.3, 0.15, 0.05]);
    let cfg = SamplingConfig {
        temperature: 1.0,
        min_p: Some(0.2),
        seed: 9,
        ..Default::default()
    };
    let c = counts(&mut cfg.sampler().unwrap(), &x, 20_000);
    assert_eq!(c[3], 0, "{c:?}");
    assert!(c[0] > 0 && c[1] > 0 && c[2] > 0, "{c:?}");
}

#[test]
fn plain_sampling_follows_the_softmax() {
    let p = [0.4, 0.3, 0.2, 0.1];
    let cfg = SamplingConfig {
        temperature: 1.0,
        seed: 11,
        ..Default::default()
    };
    let draws = 40_000;
    let c = counts(&mut cfg.sampler().unwrap(), &ln(&p), draws);
    for (i, &pi) in p.iter().enumerate() {
        let share = c[i] as f64 / draws as f64;
        let sd = (pi * (1.0 - pi) / draws as f64).sqrt();
        assert!((share - pi).abs() < 5.0 * sd, "token {i}: {share} vs {pi}");
    }
}

#[test]
fn temperature_halves_log_odds() {
    // Temperature 2 on probabilities 0.8/0.2 gives sqrt odds: 2:1 -> 2/3, 1/3.
    let cfg = SamplingConfig {
        temperature: 2.0,
        seed: 5,
        ..Default::default()
    };
    let draws = 40_000;
    let c = counts(&mut cfg.sampler().unwrap(), &ln(&[0.8, 0.2]), draws);
    let share = c[0] as f64 / draws as f64;
    assert!((share - 2.0 / 3.0).abs() < 0.012, "share {share}");
}

#[test]
fn temperature_towards_zero_equals_greedy() {
    for seed in 0..50 {
        let mut x = logits(1000, seed);
        let top = argmax(&x) as usize;
        x[top] += 0.01; // a clear winner, so a tiny temperature is one-hot
        let greedy = SamplingConfig::default()
            .sampler()
            .unwrap()
            .sample(&x, &[])
            .unwrap();
        assert_eq!(greedy as usize, top);
        let mut cold = SamplingConfig {
            temperature: 1e-5,
            top_k: Some(40),
            top_p: Some(0.9),
            seed,
            ..Default::default()
        }
        .sampler()
        .unwrap();
        for _ in 0..5 {
            assert_eq!(cold.sample(&x, &[]).unwrap(), greedy, "seed {seed}");
        }
    }
}

#[test]
fn greedy_breaks_ties_towards_the_lowest_id() {
    let mut s = SamplingConfig::default().sampler().unwrap();
    assert!(s.is_plain_greedy());
    assert_eq!(s.sample(&[0.0, 2.0, 2.0, 1.0], &[]).unwrap(), 1);
}

#[test]
fn a_fixed_seed_repeats_and_another_seed_differs() {
    let x = logits(200, 42);
    let cfg = SamplingConfig {
        temperature: 1.5,
        top_k: Some(50),
        top_p: Some(0.95),
        seed: 1234,
        ..Default::default()
    };
    let run = |cfg: &SamplingConfig| {
        let mut s = cfg.sampler().unwrap();
        (0..300)
            .map(|_| s.sample(&x, &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(&cfg), run(&cfg));
    let other = SamplingConfig {
        seed: 1235,
        ..cfg.clone()
    };
    assert_ne!(run(&cfg), run(&other));
}

#[test]
fn repetition_penalty_multiplies_negative_and_divides_positive_logits() {
    let mut s = SamplingConfig {
        repetition_penalty: 2.0,
        ..Default::default()
    }
    .sampler()
    .unwrap();
    // Negative: -0.5 becomes -1.0 (below -0.8), so token 1 wins. Dividing would give -0.25.
    assert_eq!(s.sample(&[-0.5, -0.8], &[0]).unwrap(), 1);
    // Positive: 1.0 becomes 0.5 (below 0.8).
    assert_eq!(s.sample(&[1.0, 0.8], &[0]).unwrap(), 1);
    // Counted once per distinct token, however often it was seen: 1.0 -> 0.5 > 0.4.
    assert_eq!(s.sample(&[1.0, 0.4], &[0, 0, 0]).unwrap(), 0);
    // Unseen tokens are untouched.
    assert_eq!(s.sample(&[-0.5, -0.8], &[1]).unwrap(), 0);
}

#[test]
fn penalty_window_only_counts_recent_tokens() {
    let cfg = SamplingConfig {
        repetition_penalty: 2.0,
        penalty_last_n: Some(1),
        ..Default::default()
    };
    let mut s = cfg.sampler().unwrap();
    // Token 0 is outside the last-1 window: no penalty.
    assert_eq!(s.sample(&[-0.5, -0.8], &[0, 1]).unwrap(), 0);
}

#[test]
fn frequency_and_presence_penalties_subtract() {
    let freq = |f: f32| {
        SamplingConfig {
            frequency_penalty: f,
            ..Default::default()
        }
        .sampler()
        .unwrap()
    };
    // Seen twice: 1.0 - 2·0.3 = 0.4 < 0.5; with 0.2: 0.6 > 0.5.
    assert_eq!(freq(0.3).sample(&[1.0, 0.5], &[0, 0]).unwrap(), 1);
    assert_eq!(freq(0.2).sample(&[1.0, 0.5], &[0, 0]).unwrap(), 0);
    let mut pres = SamplingConfig {
        presence_penalty: 0.6,
        ..Default::default()
    }
    .sampler()
    .unwrap();
    assert_eq!(pres.sample(&[1.0, 0.5], &[0, 0, 0]).unwrap(), 1); // 1.0 - 0.6 = 0.4
                                                                  // Negative logits go further down, too.
    assert_eq!(freq(0.3).sample(&[-0.5, -0.7], &[0]).unwrap(), 1);
}

#[test]
fn custom_chains_run_in_the_order_given() {
    // top-k 1 before a hot temperature is still greedy.
    let mut s = Sampler::new(0)
        .then(Step::TopK(1))
        .unwrap()
        .then(Step::Temperature(100.0))
        .unwrap();
    for seed in 0..20 {
        let x = logits(30, seed);
        assert_eq!(s.sample(&x, &[]).unwrap(), argmax(&x));
    }
}

#[test]
fn bad_settings_are_rejected_with_their_name() {
    let bad = [
        SamplingConfig {
            temperature: -1.0,
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.0,
            top_k: Some(0),
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.0,
            top_p: Some(0.0),
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.0,
            top_p: Some(1.5),
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.0,
            min_p: Some(-0.1),
            ..Default::default()
        },
        SamplingConfig {
            repetition_penalty: 0.0,
            ..Default::default()
        },
        SamplingConfig {
            frequency_penalty: f32::NAN,
            ..Default::default()
        },
    ];
    let names = [
        "temperature",
        "top_k",
        "top_p",
        "top_p",
        "min_p",
        "repetition_penalty",
        "penalty",
    ];
    for (cfg, name) in bad.iter().zip(names) {
        let err = cfg.sampler().unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut s = SamplingConfig {
        repetition_penalty: 1.1,
        ..Default::default()
    }
    .sampler()
    .unwrap();
    assert!(s.sample(&[], &[]).is_err());
    let err = s.sample(&[0.0, 1.0], &[7]).unwrap_err().to_string();
    assert!(err.contains("token 7"), "{err}");
    let mut t = SamplingConfig {
        temperature: 1.0,
        ..Default::default()
    }
    .sampler()
    .unwrap();
    assert!(t.sample(&[f32::NEG_INFINITY, f32::NAN], &[]).is_err());
    // Masked tokens are never drawn.
    for _ in 0..200 {
        assert_eq!(
            t.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], &[])
                .unwrap(),
            1
        );
    }
}
