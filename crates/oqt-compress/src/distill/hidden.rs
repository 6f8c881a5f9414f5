//! Hidden-state matching: the student's block outputs pulled toward the
//! teacher's, block by block through a layer map (a folded student has fewer
//! blocks: its block `l` answers for the teacher block it was before folding).
//! The loss of one matched pair is the normalized MSE
//! `mean((h_s − h_t)²) / mean(h_t²)` (LLM residual streams carry a few huge
//! channels; normalizing keeps every layer's term comparable), averaged over pairs.

use burn::tensor::{Device, Int, Tensor, TensorData};
use oqt_core::{CoreError, Result};
use oqt_model::Llama;
use oqt_model::hooks::NoHooks;

/// Student block → teacher block pairs, checked against both depths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap(pub Vec<(usize, usize)>);

impl LayerMap {
    /// Parse `auto` (resolved later) or `S:T,S:T,…`; `None` for `auto`.
    pub fn parse(text: &str) -> std::result::Result<Option<Self>, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(None);
        }
        let mut pairs = Vec::new();
        for part in text.split(',') {
            let (s, t) = part
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("layer map entry `{part}`: expected STUDENT:TEACHER (e.g. 12:15)"))?;
            let num = |v: &str| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("layer map entry `{part}`: `{v}` is not a block index"))
            };
            pairs.push((num(s)?, num(t)?));
        }
        Ok(Some(Self(pairs)))
    }

    /// The map that pairs each kept block with itself before `removed` were
    /// folded away (`removed` by their index in the teacher; empty: identity).
    pub fn folded(teacher_blocks: usize, removed: &[usize]) -> Self {
        Self(
            (0..teacher_blocks)
                .filter(|l| !removed.contains(l))
                .enumerate()
                .collect(),
        )
    }

    /// Every student and teacher block in range, no student block twice.
    pub fn check(&self, student_blocks: usize, teacher_blocks: usize) -> Result<()> {
        if self.0.is_empty() {
            return Err(CoreError::Other("the layer map pairs no blocks".into()));
        }
        let mut seen = vec![false; student_blocks];
        for &(s, t) in &self.0 {
            if s >= student_blocks {
                return Err(CoreError::Other(format!(
                    "layer map {s}:{t}: student block {s} is out of range (the student has {student_blocks} blocks)"
                )));
            }
            if t >= teacher_blocks {
                return Err(CoreError::Other(format!(
                    "layer map {s}:{t}: teacher block {t} is out of range (the teacher has {teacher_blocks} blocks)"
                )));
            }
            if std::mem::replace(&mut seen[s], true) {
                return Err(CoreError::Other(format!(
                    "layer map: student block {s} is paired twice"
                )));
            }
        }
        Ok(())
    }
}

/// The teacher kept beside the student for hidden-state targets (computed
/// each step: a teacher forward is cheap next to the student's backward,
/// and every step's states would not fit in memory).
pub struct HiddenTeacher {
    pub model: Llama,
    pub map: LayerMap,
    /// The loss term's weight.
    pub weight: f32,
}

impl HiddenTeacher {
    /// The teacher's block outputs for `windows`, as `(student block, [b, s, d])`
    /// on `device` (the student's).
    pub fn targets(&self, windows: &[Vec<u32>], device: &Device) -> Result<Vec<(usize, Tensor<3>)>> {
        let (b, s) = (windows.len(), windows.first().map_or(0, Vec::len));
        let ids: Vec<i64> = windows.iter().flatten().map(|&t| t as i64).collect();
        let teacher_device = self.model.device();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &teacher_device);
        let pos = self.model.positions(s, &teacher_device);
        let last = self.map.0.iter().map(|&(_, t)| t).max().unwrap_or(0);
        let mut x = self.model.embed_with(tokens, &NoHooks);
        let mut out = Vec::with_capacity(self.map.0.len());
        for l in 0..=last {
            x = self.model.layer_with(l, x, &pos, &NoHooks);
            for &(student, _) in self.map.0.iter().filter(|&&(_, t)| t == l) {
                out.push((student, Tensor::from_data(x.clone().into_data(), device)));
            }
        }
        Ok(out)
    }
}

/// Normalized MSE of `student` against `teacher` (same shape), a `[1]` tensor.
pub fn normalized_mse(student: Tensor<3>, teacher: Tensor<3>) -> Tensor<1> {
    let energy = teacher.clone().powf_scalar(2.0).mean();
    (student - teacher).powf_scalar(2.0).mean() / (energy + 1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_maps_parse_fold_and_refuse_out_of_range_blocks() {
        assert_eq!(LayerMap::parse("auto").unwrap(), None);
        let m = LayerMap::parse("0:0, 1:3").unwrap().unwrap();
        assert_eq!(m.0, vec![(0, 0), (1, 3)]);
        assert!(m.check(2, 4).is_ok());
        let e = m.check(2, 3).unwrap_err().to_string();
        assert!(
            e.contains("teacher block 3 is out of range") && e.contains("3 blocks"),
            "{e}"
        );
        let e = m.check(1, 4).unwrap_err().to_string();
        assert!(e.contains("student block 1 is out of range"), "{e}");
        let e = LayerMap(vec![(0, 0), (0, 1)]).check(2, 2).unwrap_err().to_string();
        assert!(e.contains("paired twice"), "{e}");
        assert!(LayerMap::parse("0-1").unwrap_err().contains("STUDENT:TEACHER"));
        assert!(LayerMap::parse("a:1").unwrap_err().contains("`a`"));
        assert_eq!(LayerMap::folded(4, &[1, 2]).0, vec![(0, 0), (1, 3)]);
    }

    #[test]
    fn matched_states_cost_nothing_and_the_teacher_gives_one_per_pair() {
        let cfg = oqt_core::testing::tiny_config();
        let device = Device::flex();
        let model = oqt_model::llama_from_weights(&cfg, oqt_core::testing::random_weights(&cfg, 2), &device);
        let t = HiddenTeacher {
            model,
            map: LayerMap(vec![(0, 1), (1, 0)]),
            weight: 1.0,
        };
        let states = t.targets(&[vec![1, 2, 3], vec![4, 5, 6]], &device).unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].1.dims(), [2, 3, cfg.hidden_size]);
        let zero = crate::stats::inputs::to_vec(normalized_mse(states[0].1.clone(), states[0].1.clone()));
        assert_eq!(zero[0], 0.0);
        let other = crate::stats::inputs::to_vec(normalized_mse(states[0].1.clone(), states[1].1.clone()));
        assert!(other[0] > 0.0);
    }
}
