//! A small append-only ONNX graph builder that refuses duplicate names, so a head name that happens to equal an
//! internal tensor name can never silently rewire the graph.

use super::OnnxError;
use super::proto::{AttributeProto, NodeProto, TensorProto};
use std::collections::HashSet;

#[derive(Debug, Default)]
pub(crate) struct GraphBuilder {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    /// Every value name in use: graph inputs, initializers and node outputs (ONNX's single value namespace).
    values: HashSet<String>,
    node_names: HashSet<String>,
}

impl GraphBuilder {
    pub fn has_value(&self, name: &str) -> bool {
        self.values.contains(name)
    }

    /// Registers a value name produced outside nodes and initializers (a graph input).
    pub fn claim_value(&mut self, name: &str) -> Result<(), OnnxError> {
        if !self.values.insert(name.to_owned()) {
            return Err(OnnxError::NameCollision { name: name.to_owned() });
        }
        Ok(())
    }

    /// Adds a float32 initializer and returns its name.
    pub fn initializer(&mut self, name: &str, dims: &[usize], data: &[f32]) -> Result<String, OnnxError> {
        self.claim_value(name)?;
        self.initializers.push(TensorProto::from_f32(name, dims, data));
        Ok(name.to_owned())
    }

    /// Adds a single-output node named `name` whose output value is `output`, and returns `output`.
    pub fn node_to(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) -> Result<String, OnnxError> {
        if !self.node_names.insert(name.to_owned()) {
            return Err(OnnxError::NameCollision { name: name.to_owned() });
        }
        self.claim_value(output)?;
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.to_owned()],
            name: name.to_owned(),
            op_type: op_type.to_owned(),
            attribute,
            ..Default::default()
        });
        Ok(output.to_owned())
    }

    /// Adds a single-output node whose output is named `{name}.out`.
    pub fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> Result<String, OnnxError> {
        self.node_to(op_type, name, inputs, &format!("{name}.out"), attribute)
    }
}
