//! NPU-style static requantization: an int32 accumulator onto the output
//! tensor's fixed grid, `clamp(round_half_even(acc · multiplier) + zp, qmin, qmax)`
//! with `multiplier = s_a · s_w / s_out` computed once in f32.

pub fn requantize(acc: &[i32], multiplier: f32, zero_point: i32, qmin: i32, qmax: i32, out: &mut [i32]) {
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = ((a as f32 * multiplier).round_ties_even() as i32 + zero_point).clamp(qmin, qmax);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even_and_clamps() {
        let mut out = [0; 5];
        requantize(&[5, 15, -5, 1000, -1000], 0.1, 10, 0, 255, &mut out);
        // 0.5 → 0, 1.5 → 2, −0.5 → −0; then + 10; 100 + 10; −100 + 10 clamps to 0.
        assert_eq!(out, [10, 12, 10, 110, 0]);
    }
}
