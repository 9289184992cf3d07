//! The learning-rate schedule: linear warm-up, then cosine decay to a floor.

/// Learning rate at optimiser step `step` of `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Steps of linear warm-up from `peak / warmup` to `peak`.
    pub warmup: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Final learning rate as a fraction of `peak`.
    pub min_ratio: f64,
}

impl Schedule {
    /// The learning rate for step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            // Never exactly 0: the first step should already move the weights.
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let decay_steps = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / decay_steps as f64).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine_to_the_floor() {
        let s = Schedule { peak: 1.0, warmup: 10, total: 110, min_ratio: 0.1 };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(4) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        // Half way through the decay: floor + (peak - floor) / 2.
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for step in 10..=110 {
            assert!(s.lr(step) <= prev + 1e-15);
            prev = s.lr(step);
        }
    }
}
