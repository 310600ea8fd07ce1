//! The names of a slots UNet's LoRA inputs (`--lora-slots R` in the
//! exporter): per module, `lora.<module>.down` [r, in] and `lora.<module>.up`
//! [out, r], with the scale folded into `up`. The exporter (`onnx/spo_onnx/
//! export/slots.py`, `slot_input_names`) writes these names; the pipeline and the
//! trainer read them only through this module.

/// Every slot input starts with this.
const PREFIX: &str = "lora.";

/// The `down` input of `module`'s slot.
pub fn down_input(module: &str) -> String {
    format!("{PREFIX}{module}.down")
}

/// The `up` input of `module`'s slot.
pub fn up_input(module: &str) -> String {
    format!("{PREFIX}{module}.up")
}

/// Whether a graph input is a LoRA slot.
pub fn is_slot_input(name: &str) -> bool {
    name.starts_with(PREFIX) && (name.ends_with(".down") || name.ends_with(".up"))
}
