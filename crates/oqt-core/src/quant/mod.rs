//! The quantization vocabulary both worlds share: what a recipe asks for
//! ([`spec`]), the named recipes ([`recipe`]) and the reference arithmetic that
//! turns float weights into integers ([`weights`]). The fake quantizers on the
//! Burn side and the integer kernels of the runtime both follow these
//! definitions, so simulation and deployment cannot disagree.

pub mod mixed_precision;
pub mod pack;
pub mod recipe;
pub mod sites;
pub mod spec;
pub mod weights;

pub use mixed_precision::{MixedPrecisionSpec, SizeBudget};
pub use recipe::{
    ActRange, CLUSTER_METHODS, CalibrationSpec, Checkpointing, ClusterStep, FOLD_METHODS, FoldStep, LayerLoss,
    LoraStep, MobileQuantSpec, PRUNE_METHODS, PruneStep, QUANTIZE_METHODS, QatStep, QuantizeStep, Recipe, Step,
    TrainLayers, TransformInit, builtin_recipe, builtin_recipe_names, load_recipe,
};
pub use sites::{ActGrid, ActSite, SiteGrids, static_sites};
pub use spec::{ActMode, ActSpec, Granularity, KvSpec, QuantSpec, Rounding, ScaleRule, TensorOverride, WeightSpec};
pub use weights::{QuantizedWeight, dequantize_weight, quantize_weight, quantize_weight_mse, quantize_weight_rows};
