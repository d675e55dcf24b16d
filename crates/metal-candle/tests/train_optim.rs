//! AdamW, schedules and gradient clipping against hand-computed values.

use candle_core::{Device, Tensor, Var};
use metal_candle::train::{
    clip_factor, clip_grad_norm, global_grad_norm, AdamW, AdamWConfig, LrSchedule, ScheduleKind,
};

#[test]
fn adamw_matches_hand_computation_over_two_steps() {
    let p0 = [0.5f64, -1.0, 2.0];
    let var = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg.clone()).unwrap();
    let grads = [[0.1f64, -0.2, 0.3], [0.05, 0.4, -0.1]];
    let lrs = [0.01, 0.02];
    // Hand computation (PyTorch AdamW semantics).
    let (mut p, mut m, mut v) = (p0.to_vec(), vec![0f64; 3], vec![0f64; 3]);
    for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
        let t = (t + 1) as i32;
        for i in 0..3 {
            p[i] *= 1.0 - lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let mh = m[i] / (1.0 - cfg.beta1.powi(t));
            let vh = v[i] / (1.0 - cfg.beta2.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + cfg.eps);
        }
        let gt = Tensor::new(&[g[0] as f32, g[1] as f32, g[2] as f32], &Device::Cpu).unwrap();
        opt.step(&[Some(gt)], lr).unwrap();
    }
    let got = var.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..3 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
    }
    assert_eq!(opt.steps_taken(), 2);
}

#[test]
fn adamw_state_round_trips_through_a_file() {
    let dev = Device::Cpu;
    let mk = || Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
    let (a, b) = (mk(), mk());
    let mut o1 = AdamW::new(vec![("p".into(), a.clone())], AdamWConfig::default()).unwrap();
    let g = Tensor::new(&[0.3f32, -0.7], &dev).unwrap();
    o1.step(&[Some(g.clone())], 0.1).unwrap();
    let dir = std::env::temp_dir().join(format!("mc-adamw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    o1.save(&dir.join("opt.safetensors")).unwrap();
    b.set(a.as_tensor()).unwrap();
    let mut o2 = AdamW::new(vec![("p".into(), b.clone())], AdamWConfig::default()).unwrap();
    o2.load(&dir.join("opt.safetensors")).unwrap();
    o1.step(&[Some(g.clone())], 0.1).unwrap();
    o2.step(&[Some(g)], 0.1).unwrap();
    assert_eq!(
        a.as_tensor().to_vec1::<f32>().unwrap(),
        b.as_tensor().to_vec1::<f32>().unwrap()
    );
    // A state for other parameters is refused with the missing name.
    let c = Var::from_tensor(&Tensor::new(&[1f32], &dev).unwrap()).unwrap();
    let mut o3 = AdamW::new(vec![("q".into(), c)], AdamWConfig::default()).unwrap();
    let err = o3
        .load(&dir.join("opt.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("m.q"), "{err}");
}

#[test]
fn schedules_give_the_expected_rates() {
    let c = LrSchedule::new(ScheduleKind::Constant, 1.0, 0, 10).unwrap();
    assert!((0..10).all(|s| c.lr_at(s) == 1.0));
    let l = LrSchedule::new(ScheduleKind::Linear, 1.0, 2, 12).unwrap();
    for (s, w) in [(0, 0.5), (1, 1.0), (2, 1.0), (7, 0.5), (11, 0.1)] {
        assert!(
            (l.lr_at(s) - w).abs() < 1e-12,
            "step {s}: {} vs {w}",
            l.lr_at(s)
        );
    }
    let cos = LrSchedule::new(ScheduleKind::Cosine, 2.0, 0, 4)
        .unwrap()
        .with_min_lr(0.0);
    let want = [
        2.0,
        1.0 + std::f64::consts::FRAC_1_SQRT_2 * 1.0 / 1.0 * 1.0,
        1.0,
        1.0 - std::f64::consts::FRAC_1_SQRT_2,
    ];
    for (s, w) in want.iter().enumerate() {
        assert!(
            (cos.lr_at(s) - w).abs() < 1e-12,
            "step {s}: {} vs {w}",
            cos.lr_at(s)
        );
    }
    assert!(LrSchedule::new(ScheduleKind::Cosine, 1.0, 11, 10).is_err());
    assert!(LrSchedule::new(ScheduleKind::Cosine, -1.0, 0, 10).is_err());
    assert!("warmup-cosine".parse::<ScheduleKind>().is_err());
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let dev = Device::Cpu;
    let mut grads = vec![
        Some(Tensor::new(&[3f32, 0.0], &dev).unwrap()),
        None,
        Some(Tensor::new(&[4f32], &dev).unwrap()),
    ];
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    let a = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
    let b = grads[2].as_ref().unwrap().to_vec1::<f32>().unwrap();
    assert!(((a[0] * a[0] + b[0] * b[0]).sqrt() - 1.0).abs() < 1e-5);
    let mut small = vec![Some(Tensor::new(&[0.1f32], &dev).unwrap())];
    clip_grad_norm(&mut small, 1.0).unwrap();
    assert_eq!(
        small[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.1]
    );
}

#[test]
fn a_scaled_step_equals_a_step_on_clipped_gradients() {
    let dev = Device::Cpu;
    let cfg = AdamWConfig {
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    let init = [
        Tensor::randn(0f32, 1., (5, 3), &dev).unwrap(),
        Tensor::randn(0f32, 1., (3, 7), &dev).unwrap(),
    ];
    let vars = |_: ()| -> Vec<(String, Var)> {
        init.iter()
            .enumerate()
            .map(|(i, t)| (format!("p{i}"), Var::from_tensor(t).unwrap()))
            .collect()
    };
    let (va, vb) = (vars(()), vars(()));
    let mut folded = AdamW::new(va.clone(), cfg.clone()).unwrap();
    let mut clipped = AdamW::new(vb.clone(), cfg).unwrap();
    for step in 0..3 {
        let grads: Vec<Option<Tensor>> = init
            .iter()
            .map(|t| {
                Some((Tensor::randn(0f32, 3., t.dims(), &dev).unwrap() + step as f64).unwrap())
            })
            .collect();
        let norm = global_grad_norm(&grads).unwrap();
        let factor = clip_factor(norm, 1.0);
        assert!(factor < 1.0, "the test needs gradients that get clipped");
        folded.step_scaled(&grads, 0.01, factor).unwrap();
        let mut g2 = grads.clone();
        assert!((clip_grad_norm(&mut g2, 1.0).unwrap() - norm).abs() < 1e-9);
        clipped.step(&g2, 0.01).unwrap();
    }
    for ((_, a), (_, b)) in va.iter().zip(&vb) {
        let d = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "folded and separate clipping differ by {d}");
        assert!(a.as_tensor().dims() == b.as_tensor().dims());
    }
}

#[test]
fn the_global_norm_of_no_gradients_is_zero() {
    assert_eq!(global_grad_norm(&[None, None]).unwrap(), 0.0);
    assert_eq!(clip_factor(0.0, 1.0), 1.0);
    assert_eq!(clip_factor(f64::NAN, 1.0), 1.0);
}
