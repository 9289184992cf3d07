//! The subset of `onnx.proto3` the exporter (and later the INT8 quantizer) reads and writes, as hand-written `prost`
//! messages. There is no `protoc` in the build, so the field numbers below are copied from `onnx/onnx.proto3` and are
//! pinned by the wire-format tests at the bottom of this file: a wrong tag still round-trips through our own decoder
//! but produces a model ONNX Runtime rejects or misreads.
//!
//! Fields we never produce (sparse tensors, training info, functions, external data, ...) are left out; `prost`
//! skips unknown fields when decoding, so reading a foreign model drops them rather than failing.

/// `onnx.ModelProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `onnx.OperatorSetIdProto`; an empty domain is the default `ai.onnx` operator set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `onnx.StringStringEntryProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `onnx.GraphProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    /// Topologically sorted.
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(string, tag = "10")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

/// `onnx.NodeProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(string, tag = "7")]
    pub domain: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "6")]
    pub doc_string: String,
}

/// `onnx.AttributeProto`. Exactly one value field is meaningful, selected by `type`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "21")]
    pub ref_attr_name: String,
    #[prost(string, tag = "13")]
    pub doc_string: String,
    #[prost(enumeration = "AttributeType", tag = "20")]
    pub r#type: i32,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(message, optional, tag = "6")]
    pub g: Option<GraphProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "10")]
    pub tensors: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub graphs: Vec<GraphProto>,
}

/// `onnx.AttributeProto.AttributeType`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AttributeType {
    Undefined = 0,
    Float = 1,
    Int = 2,
    String = 3,
    Tensor = 4,
    Graph = 5,
    Floats = 6,
    Ints = 7,
    Strings = 8,
    Tensors = 9,
    Graphs = 10,
    SparseTensor = 11,
    SparseTensors = 12,
    TypeProto = 13,
    TypeProtos = 14,
}

impl AttributeProto {
    pub fn int(name: &str, value: i64) -> Self {
        Self { name: name.into(), r#type: AttributeType::Int as i32, i: value, ..Default::default() }
    }

    pub fn ints(name: &str, values: &[i64]) -> Self {
        Self { name: name.into(), r#type: AttributeType::Ints as i32, ints: values.to_vec(), ..Default::default() }
    }

    pub fn float(name: &str, value: f32) -> Self {
        Self { name: name.into(), r#type: AttributeType::Float as i32, f: value, ..Default::default() }
    }
}

/// `onnx.TensorProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// A [`DataType`] value.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    /// Fixed-width little-endian elements, row-major.
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(uint64, repeated, tag = "11")]
    pub uint64_data: Vec<u64>,
    #[prost(string, tag = "12")]
    pub doc_string: String,
}

/// `onnx.TensorProto.DataType`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    Undefined = 0,
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Uint16 = 4,
    Int16 = 5,
    Int32 = 6,
    Int64 = 7,
    String = 8,
    Bool = 9,
    Float16 = 10,
    Double = 11,
    Uint32 = 12,
    Uint64 = 13,
    Complex64 = 14,
    Complex128 = 15,
    Bfloat16 = 16,
}

impl TensorProto {
    /// A float32 tensor stored as little-endian `raw_data` (the compact form ONNX Runtime loads without conversion).
    pub fn from_f32(name: &str, dims: &[usize], data: &[f32]) -> Self {
        let mut raw = Vec::with_capacity(data.len() * 4);
        for v in data {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        Self {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// The elements of a float32 tensor, whether stored in `raw_data` or `float_data`; `None` for other data types
    /// or when the payload length does not match `dims`.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        if self.data_type != DataType::Float as i32 {
            return None;
        }
        let numel = self.dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))?;
        let data: Vec<f32> = if self.raw_data.is_empty() && !self.float_data.is_empty() {
            self.float_data.clone()
        } else {
            if !self.raw_data.len().is_multiple_of(4) {
                return None;
            }
            self.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        (data.len() == numel).then_some(data)
    }
}

/// `onnx.ValueInfoProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    #[prost(string, tag = "3")]
    pub doc_string: String,
}

impl ValueInfoProto {
    /// A tensor value of the given element type and shape.
    pub fn tensor(name: &str, elem_type: DataType, dims: Vec<Dim>) -> Self {
        Self {
            name: name.into(),
            r#type: Some(TypeProto {
                denotation: String::new(),
                value: Some(type_proto::Value::TensorType(TypeProtoTensor {
                    elem_type: elem_type as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .into_iter()
                            .map(|d| Dimension {
                                denotation: String::new(),
                                value: Some(match d {
                                    Dim::Fixed(v) => dimension::Value::DimValue(v),
                                    Dim::Param(p) => dimension::Value::DimParam(p),
                                }),
                            })
                            .collect(),
                    }),
                })),
            }),
            doc_string: String::new(),
        }
    }

    /// Element type and dimensions when this is a tensor value, `None` otherwise.
    pub fn tensor_shape(&self) -> Option<(i32, Vec<Dim>)> {
        let Some(type_proto::Value::TensorType(t)) = self.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        let dims = t
            .shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(dimension::Value::DimValue(v)) => Dim::Fixed(*v),
                Some(dimension::Value::DimParam(p)) => Dim::Param(p.clone()),
                // An unnamed unknown dimension; ONNX allows it, and an empty parameter name says the same.
                None => Dim::Param(String::new()),
            })
            .collect();
        Some((t.elem_type, dims))
    }
}

/// A convenience view of one `TensorShapeProto.Dimension`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// Symbolic, e.g. the dynamic `batch` dimension.
    Param(String),
}

/// `onnx.TypeProto` (tensor types only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    #[prost(string, tag = "6")]
    pub denotation: String,
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
}

pub mod type_proto {
    /// `TypeProto.value`; sequence/map/optional types are not modelled.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(super::TypeProtoTensor),
    }
}

/// `onnx.TypeProto.Tensor`
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProtoTensor {
    /// A [`DataType`] value.
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `onnx.TensorShapeProto`
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `onnx.TensorShapeProto.Dimension`
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dimension {
    #[prost(string, tag = "3")]
    pub denotation: String,
    #[prost(oneof = "dimension::Value", tags = "1, 2")]
    pub value: Option<dimension::Value>,
}

pub mod dimension {
    /// `Dimension.value`
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(int64, tag = "1")]
        DimValue(i64),
        #[prost(string, tag = "2")]
        DimParam(String),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Protobuf key byte for a field: `(tag << 3) | wire_type` (0 varint, 2 length-delimited). Tags ≥ 16 need two
    /// bytes, handled by `key`.
    fn key(tag: u32, wire: u32) -> Vec<u8> {
        let mut v = (tag << 3) | wire;
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(tag: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = key(tag, 2);
        assert!(payload.len() < 128);
        out.push(payload.len() as u8);
        out.extend_from_slice(payload);
        out
    }

    // These pin every field number we emit against onnx.proto3 by checking the raw encoding of single fields.

    #[test]
    fn model_proto_field_numbers() {
        let enc = |m: ModelProto| m.encode_to_vec();
        assert_eq!(enc(ModelProto { ir_version: 8, ..Default::default() }), [key(1, 0), vec![8]].concat());
        assert_eq!(enc(ModelProto { producer_name: "p".into(), ..Default::default() }), bytes_field(2, b"p"));
        assert_eq!(enc(ModelProto { producer_version: "v".into(), ..Default::default() }), bytes_field(3, b"v"));
        assert_eq!(enc(ModelProto { domain: "d".into(), ..Default::default() }), bytes_field(4, b"d"));
        assert_eq!(enc(ModelProto { model_version: 3, ..Default::default() }), [key(5, 0), vec![3]].concat());
        assert_eq!(enc(ModelProto { doc_string: "x".into(), ..Default::default() }), bytes_field(6, b"x"));
        assert_eq!(enc(ModelProto { graph: Some(GraphProto::default()), ..Default::default() }), bytes_field(7, b""));
        let opset = OperatorSetIdProto { domain: String::new(), version: 17 };
        assert_eq!(opset.encode_to_vec(), [key(2, 0), vec![17]].concat());
        assert_eq!(
            enc(ModelProto { opset_import: vec![opset], ..Default::default() }),
            bytes_field(8, &[key(2, 0), vec![17]].concat())
        );
        let kv = StringStringEntryProto { key: "k".into(), value: "v".into() };
        assert_eq!(kv.encode_to_vec(), [bytes_field(1, b"k"), bytes_field(2, b"v")].concat());
        assert_eq!(
            enc(ModelProto { metadata_props: vec![kv.clone()], ..Default::default() }),
            bytes_field(14, &kv.encode_to_vec())
        );
    }

    #[test]
    fn graph_and_node_field_numbers() {
        let g = |g: GraphProto| g.encode_to_vec();
        assert_eq!(g(GraphProto { node: vec![NodeProto::default()], ..Default::default() }), bytes_field(1, b""));
        assert_eq!(g(GraphProto { name: "n".into(), ..Default::default() }), bytes_field(2, b"n"));
        assert_eq!(
            g(GraphProto { initializer: vec![TensorProto::default()], ..Default::default() }),
            bytes_field(5, b"")
        );
        assert_eq!(g(GraphProto { doc_string: "d".into(), ..Default::default() }), bytes_field(10, b"d"));
        let vi = || vec![ValueInfoProto::default()];
        assert_eq!(g(GraphProto { input: vi(), ..Default::default() }), bytes_field(11, b""));
        assert_eq!(g(GraphProto { output: vi(), ..Default::default() }), bytes_field(12, b""));
        assert_eq!(g(GraphProto { value_info: vi(), ..Default::default() }), bytes_field(13, b""));

        let n = |n: NodeProto| n.encode_to_vec();
        assert_eq!(n(NodeProto { input: vec!["a".into()], ..Default::default() }), bytes_field(1, b"a"));
        assert_eq!(n(NodeProto { output: vec!["b".into()], ..Default::default() }), bytes_field(2, b"b"));
        assert_eq!(n(NodeProto { name: "c".into(), ..Default::default() }), bytes_field(3, b"c"));
        assert_eq!(n(NodeProto { op_type: "Conv".into(), ..Default::default() }), bytes_field(4, b"Conv"));
        assert_eq!(
            n(NodeProto { attribute: vec![AttributeProto::default()], ..Default::default() }),
            bytes_field(5, b"")
        );
        assert_eq!(n(NodeProto { doc_string: "d".into(), ..Default::default() }), bytes_field(6, b"d"));
        assert_eq!(n(NodeProto { domain: "x".into(), ..Default::default() }), bytes_field(7, b"x"));
    }

    #[test]
    fn attribute_field_numbers() {
        let a = AttributeProto::int("group", 32);
        assert_eq!(a.encode_to_vec(), [bytes_field(1, b"group"), key(3, 0), vec![32], key(20, 0), vec![2]].concat());
        let a = AttributeProto::ints("pads", &[0, 1]);
        // Repeated scalars are packed in proto3.
        assert_eq!(a.encode_to_vec(), [bytes_field(1, b"pads"), bytes_field(8, &[0, 1]), key(20, 0), vec![7]].concat());
        let a = AttributeProto::float("alpha", 1.0);
        assert_eq!(
            a.encode_to_vec(),
            [bytes_field(1, b"alpha"), key(2, 5), 1.0f32.to_le_bytes().to_vec(), key(20, 0), vec![1]].concat()
        );
        assert_eq!(AttributeType::Tensor as i32, 4);
        assert_eq!(AttributeType::Floats as i32, 6);
        assert_eq!(AttributeType::Strings as i32, 8);
        let t = AttributeProto { t: Some(TensorProto::default()), ..Default::default() };
        assert_eq!(t.encode_to_vec(), bytes_field(5, b""));
        let s = AttributeProto { s: b"q".to_vec(), ..Default::default() };
        assert_eq!(s.encode_to_vec(), bytes_field(4, b"q"));
        let g = AttributeProto { g: Some(GraphProto::default()), ..Default::default() };
        assert_eq!(g.encode_to_vec(), bytes_field(6, b""));
        let fs = AttributeProto { floats: vec![0.0], ..Default::default() };
        assert_eq!(fs.encode_to_vec(), bytes_field(7, &[0, 0, 0, 0]));
    }

    #[test]
    fn tensor_field_numbers_and_raw_data() {
        let t = TensorProto::from_f32("w", &[2], &[1.0, -2.0]);
        let raw = [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat();
        assert_eq!(
            t.encode_to_vec(),
            [bytes_field(1, &[2]), key(2, 0), vec![1], bytes_field(8, b"w"), bytes_field(9, &raw)].concat()
        );
        assert_eq!(t.to_f32(), Some(vec![1.0, -2.0]));
        let f = TensorProto { float_data: vec![0.0], ..Default::default() };
        assert_eq!(f.encode_to_vec(), bytes_field(4, &[0, 0, 0, 0]));
        let i = TensorProto { int32_data: vec![5], ..Default::default() };
        assert_eq!(i.encode_to_vec(), bytes_field(5, &[5]));
        let i = TensorProto { int64_data: vec![5], ..Default::default() };
        assert_eq!(i.encode_to_vec(), bytes_field(7, &[5]));
        let d = TensorProto { double_data: vec![0.0], ..Default::default() };
        assert_eq!(d.encode_to_vec(), bytes_field(10, &[0; 8]));
        let u = TensorProto { uint64_data: vec![5], ..Default::default() };
        assert_eq!(u.encode_to_vec(), bytes_field(11, &[5]));
        let doc = TensorProto { doc_string: "d".into(), ..Default::default() };
        assert_eq!(doc.encode_to_vec(), bytes_field(12, b"d"));
        assert_eq!(DataType::Int8 as i32, 3);
        assert_eq!(DataType::Int64 as i32, 7);
        assert_eq!(DataType::Bfloat16 as i32, 16);
        // Scalar float stored as float_data, or a length mismatch.
        let s = TensorProto { data_type: 1, float_data: vec![6.0], ..Default::default() };
        assert_eq!(s.to_f32(), Some(vec![6.0]));
        let bad = TensorProto { data_type: 1, dims: vec![3], raw_data: vec![0; 8], ..Default::default() };
        assert_eq!(bad.to_f32(), None);
    }

    #[test]
    fn value_info_field_numbers() {
        let v = ValueInfoProto::tensor("x", DataType::Float, vec![Dim::Param("b".into()), Dim::Fixed(3)]);
        let dim_b = bytes_field(1, &bytes_field(2, b"b")); // Dimension.dim_param = 2 inside TensorShapeProto.dim = 1
        let dim_3 = bytes_field(1, &[key(1, 0), vec![3]].concat()); // Dimension.dim_value = 1
        let shape = [dim_b, dim_3].concat();
        let tensor = [key(1, 0), vec![1], bytes_field(2, &shape)].concat(); // elem_type = 1, shape = 2
        let ty = bytes_field(1, &tensor); // TypeProto.tensor_type = 1
        assert_eq!(v.encode_to_vec(), [bytes_field(1, b"x"), bytes_field(2, &ty)].concat());
        let d = ValueInfoProto { doc_string: "d".into(), ..Default::default() };
        assert_eq!(d.encode_to_vec(), bytes_field(3, b"d"));
        let decoded = ValueInfoProto::decode(v.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.tensor_shape(), Some((1, vec![Dim::Param("b".into()), Dim::Fixed(3)])));
    }
}
