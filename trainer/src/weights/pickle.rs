//! A restricted pickle virtual machine for PyTorch checkpoints.
//!
//! Python's pickle format is a program: `GLOBAL` names any importable callable and `REDUCE` calls it, which is how a
//! hostile `.pth` runs code. This VM never calls anything. Every `GLOBAL` is resolved against a short allow-list of
//! the names torch's own `torch.save` emits for plain state dicts ([`Global`]); any other name fails with
//! [`WeightsError::ForbiddenGlobal`] the moment it is read, before anything else happens. The allow-listed callables
//! are *interpreted* (e.g. `_rebuild_tensor_v2` produces a [`TensorRef`] description, not a tensor), and storages
//! are only described by their persistent ids; their bytes are fetched by the caller afterwards.
//!
//! Robustness: every read is bounds-checked, every length is checked against the remaining input before anything is
//! allocated, memo keys live in a hash map (a 32-bit key cannot make us allocate a 4G-entry table), and containers
//! live in an arena addressed by index so that shared and even self-referencing structures (legal in pickle) cost
//! nothing to copy and cannot leak or overflow the stack when dropped. Work and memory are linear in the input size.

use super::error::WeightsError;
use super::raw::DType;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

/// Index into [`Unpickled::objs`].
pub(crate) type ObjId = usize;

/// Longest text line (`GLOBAL` module/name, text `INT`, ...) we accept; real ones are a few dozen bytes.
const MAX_LINE: usize = 4096;
/// Nesting depth of `MARK`s; pickles of plain containers rarely go beyond a handful.
const MAX_MARK_DEPTH: usize = 10_000;
/// Tensor rank limit; torch itself caps at 64 dimensions.
const MAX_NDIM: usize = 64;
/// Elements copied out of containers (by REDUCE arguments, `OrderedDict(items)`, ...) per input byte. Copies are the
/// one place where a pickle could make us do more than linear work (REDUCE of one memoized huge list, repeatedly);
/// real checkpoints copy only small argument tuples, far below this.
const WORK_PER_BYTE: usize = 16;

#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// Integers wider than 64 bits as little-endian two's-complement bytes; only the legacy format's magic number
    /// needs one.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Obj(ObjId),
}

#[derive(Debug)]
pub(crate) enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered pairs; a repeated key is kept twice and the later one wins when read (as in Python).
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An instance of an allow-listed plain-data class (`argparse.Namespace` in timm training checkpoints); its state
    /// is dropped.
    Opaque(&'static str),
}

/// The allow-list. Anything a pickle may name is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.Parameter`: only ever an argument to `_rebuild_from_type_v2`.
    TensorType,
    StorageType(DType),
    Dtype(DType),
    /// `_codecs.encode`, which protocol-2 pickles use to carry `bytes`.
    CodecsEncode,
    TorchSize,
    Set,
    FrozenSet,
    Namespace,
}

fn resolve_global(module: &str, name: &str) -> Result<Global, WeightsError> {
    let storage = |n: &str| -> Option<DType> {
        Some(match n {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" | "UntypedStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    };
    let dtype = |n: &str| -> Option<DType> {
        Some(match n {
            "float32" | "float" => DType::F32,
            "float64" | "double" => DType::F64,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    };
    let found = match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor_v3") => Some(Global::RebuildTensorV3),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Some(Global::RebuildParameterWithState),
        ("torch._tensor", "_rebuild_from_type_v2") => Some(Global::RebuildFromTypeV2),
        ("torch._tensor", "Tensor") | ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => {
            Some(Global::TensorType)
        }
        ("torch", "Size") => Some(Global::TorchSize),
        ("_codecs", "encode") => Some(Global::CodecsEncode),
        ("builtins" | "__builtin__", "set") => Some(Global::Set),
        ("builtins" | "__builtin__", "frozenset") => Some(Global::FrozenSet),
        ("argparse", "Namespace") => Some(Global::Namespace),
        ("torch" | "torch.cuda" | "torch.storage", n) => storage(n)
            .map(Global::StorageType)
            .or_else(|| if module == "torch" { dtype(n).map(Global::Dtype) } else { None }),
        _ => None,
    };
    found.ok_or_else(|| WeightsError::ForbiddenGlobal { module: module.to_owned(), name: name.to_owned() })
}

/// A storage as described by a torch persistent id; its bytes live elsewhere (zip member or legacy data section).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageRef {
    pub key: Rc<str>,
    pub dtype: DType,
    /// Elements in the storage as declared by the pickle.
    pub numel: u64,
    /// Legacy format only: this storage is a view `[offset, offset + size)` (in elements) of storage `key`.
    pub view: Option<(u64, u64)>,
}

/// What `_rebuild_tensor_v2(storage, offset, size, stride, ...)` describes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    /// Element type of the tensor; differs from the storage's only via `_rebuild_tensor_v3`.
    pub dtype: DType,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// The result of running one pickle.
#[derive(Debug)]
pub(crate) struct Unpickled {
    pub root: Value,
    pub objs: Vec<Obj>,
    /// Byte offset just past the `STOP` opcode (legacy files are several pickles back to back).
    pub end: usize,
}

impl Unpickled {
    pub fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(id) => self.objs.get(*id),
            _ => None,
        }
    }

    pub fn dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match self.obj(v) {
            Some(Obj::Dict(items)) => Some(items),
            _ => None,
        }
    }

    pub fn tensor(&self, v: &Value) -> Option<&TensorRef> {
        match self.obj(v) {
            Some(Obj::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    pub fn list(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::List(items) | Obj::Tuple(items)) => Some(items),
            _ => None,
        }
    }

    /// Short human-readable rendering for error messages.
    pub fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::BigInt(_) => "<big int>".into(),
            Value::Float(x) => x.to_string(),
            Value::Str(s) => format!("{:?}", truncate(s, 60)),
            Value::Bytes(b) => format!("<{} bytes>", b.len()),
            Value::Obj(_) => match self.obj(v) {
                Some(Obj::Tuple(_)) => "<tuple>".into(),
                Some(Obj::List(_)) => "<list>".into(),
                Some(Obj::Dict(_)) => "<dict>".into(),
                Some(Obj::Set(_)) => "<set>".into(),
                Some(Obj::Global(g)) => format!("<{g:?}>"),
                Some(Obj::Storage(_)) => "<storage>".into(),
                Some(Obj::Tensor(_)) => "<tensor>".into(),
                Some(Obj::Opaque(n)) => format!("<{n}>"),
                None => "<?>".into(),
            },
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Runs the pickle that starts at `data[start]` up to its `STOP`.
pub(crate) fn unpickle(data: &[u8], start: usize) -> Result<Unpickled, WeightsError> {
    let mut vm = Vm {
        data,
        pos: start,
        stack: Vec::new(),
        metastack: Vec::new(),
        memo: HashMap::new(),
        objs: Vec::new(),
        work_left: Cell::new(data.len().saturating_mul(WORK_PER_BYTE).saturating_add(1 << 20)),
    };
    let root = vm.run()?;
    Ok(Unpickled { root, objs: vm.objs, end: vm.pos })
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Python's model: `MARK` pushes the current stack onto the metastack and starts an empty one.
    stack: Vec<Value>,
    metastack: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    /// Remaining copy budget, see [`WORK_PER_BYTE`]. A `Cell` because copies happen in `&self` helpers.
    work_left: Cell<usize>,
}

impl<'a> Vm<'a> {
    fn err(&self, reason: impl Into<String>) -> WeightsError {
        WeightsError::Pickle { offset: self.pos, reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WeightsError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            self.err(format!("needs {n} more bytes but only {} remain", self.data.len().saturating_sub(self.pos)))
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WeightsError> {
        let s = self.take(N)?;
        // take() returned exactly N bytes.
        s.try_into().map_err(|_| self.err("internal: short read"))
    }

    fn u8(&mut self) -> Result<u8, WeightsError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, WeightsError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Result<usize, WeightsError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.err(format!("length {n} does not fit in memory")))
    }

    fn line(&mut self) -> Result<&'a str, WeightsError> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest
            .iter()
            .take(MAX_LINE)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated or over-long text argument"))?;
        let s = self.take(n + 1)?;
        std::str::from_utf8(&s[..n]).map_err(|_| self.err("text argument is not UTF-8"))
    }

    fn utf8(&mut self, n: usize) -> Result<Value, WeightsError> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| self.err("string is not valid UTF-8"))?;
        Ok(Value::Str(s.into()))
    }

    fn alloc(&mut self, o: Obj) -> Value {
        self.objs.push(o);
        Value::Obj(self.objs.len() - 1)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value, WeightsError> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<&Value, WeightsError> {
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, WeightsError> {
        let prev = self.metastack.pop().ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(std::mem::replace(&mut self.stack, prev))
    }

    fn obj_mut(&mut self, v: &Value) -> Result<&mut Obj, WeightsError> {
        let pos = self.pos;
        match v {
            Value::Obj(id) => {
                self.objs.get_mut(*id).ok_or(WeightsError::Pickle { offset: pos, reason: "dangling object".into() })
            }
            _ => Err(WeightsError::Pickle { offset: pos, reason: "expected a container".into() }),
        }
    }

    fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(id) => self.objs.get(*id),
            _ => None,
        }
    }

    fn tuple_items(&self, v: &Value) -> Result<Vec<Value>, WeightsError> {
        match v {
            Value::Obj(id) => match self.objs.get(*id) {
                Some(Obj::Tuple(items) | Obj::List(items)) => {
                    let left = self.work_left.get().checked_sub(items.len()).ok_or_else(|| {
                        self.err("pickle copies far more data than its size justifies (amplification attack?)")
                    })?;
                    self.work_left.set(left);
                    Ok(items.clone())
                }
                _ => Err(self.err("expected a tuple")),
            },
            _ => Err(self.err("expected a tuple")),
        }
    }

    fn global(&self, v: &Value) -> Option<Global> {
        match v {
            Value::Obj(id) => match self.objs.get(*id) {
                Some(Obj::Global(g)) => Some(*g),
                _ => None,
            },
            _ => None,
        }
    }

    fn memo_get(&self, key: u32) -> Result<Value, WeightsError> {
        self.memo.get(&key).cloned().ok_or_else(|| self.err(format!("memo key {key} not defined")))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), WeightsError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value, WeightsError> {
        loop {
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                // FRAME: a length hint only; framing does not change the opcode stream.
                0x95 => {
                    self.take(8)?;
                }
                // STOP
                b'.' => return self.pop(),
                // MARK
                b'(' => {
                    if self.metastack.len() >= MAX_MARK_DEPTH {
                        return Err(self.err("MARKs nested too deeply"));
                    }
                    let cur = std::mem::take(&mut self.stack);
                    self.metastack.push(cur);
                }
                // POP: like Python, popping an empty stack discards the innermost mark.
                b'0' => {
                    if self.stack.pop().is_none() {
                        self.pop_mark()?;
                    }
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // DUP
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()));
                }
                // LONG1, LONG4
                0x8a => {
                    let n = usize::from(self.u8()?);
                    let b = self.take(n)?;
                    self.push(decode_long(b));
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative LONG4 length"))?;
                    let b = self.take(n)?;
                    self.push(decode_long(b));
                }
                // INT, LONG (text, protocol 0)
                b'I' | b'L' => {
                    let line = self.line()?;
                    let v = match line {
                        "01" if op == b'I' => Value::Bool(true),
                        "00" if op == b'I' => Value::Bool(false),
                        _ => {
                            let digits = line.strip_suffix('L').unwrap_or(line);
                            Value::Int(digits.parse().map_err(|_| self.err(format!("bad integer {line:?}")))?)
                        }
                    };
                    self.push(v);
                }
                // FLOAT (text), BINFLOAT (big-endian)
                b'F' => {
                    let line = self.line()?;
                    let v: f64 = line.parse().map_err(|_| self.err(format!("bad float {line:?}")))?;
                    self.push(Value::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                // SHORT_BINSTRING, BINSTRING: Python 2 `str`; decoded leniently since only names use them.
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        usize::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.array()?);
                        usize::try_from(n).map_err(|_| self.err("negative BINSTRING length"))?
                    };
                    let b = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(b).into()));
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => usize::from(self.u8()?),
                        b'B' => self.u32()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?;
                    self.push(Value::Bytes(b.into()));
                }
                // EMPTY_TUPLE, TUPLE, TUPLE1..3
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()));
                    self.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                // EMPTY_LIST, LIST, APPEND, APPENDS
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()));
                    self.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items));
                    self.push(v);
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target)? {
                        Obj::List(items) => items.push(item),
                        _ => return Err(self.err("APPEND to a non-list")),
                    }
                }
                b'e' => {
                    let new = self.pop_mark()?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target)? {
                        Obj::List(items) => items.extend(new),
                        _ => return Err(self.err("APPENDS to a non-list")),
                    }
                }
                // EMPTY_DICT, DICT, SETITEM, SETITEMS
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()));
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items).ok_or_else(|| self.err("DICT with an odd number of items"))?;
                    let v = self.alloc(Obj::Dict(pairs));
                    self.push(v);
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target)? {
                        Obj::Dict(items) => items.push((key, value)),
                        _ => return Err(self.err("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items).ok_or_else(|| self.err("SETITEMS with an odd number of items"))?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target)? {
                        Obj::Dict(items) => items.extend(new),
                        _ => return Err(self.err("SETITEMS on a non-dict")),
                    }
                }
                // EMPTY_SET, ADDITEMS, FROZENSET
                0x8f => {
                    let v = self.alloc(Obj::Set(Vec::new()));
                    self.push(v);
                }
                0x90 => {
                    let new = self.pop_mark()?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target)? {
                        Obj::Set(items) => items.extend(new),
                        _ => return Err(self.err("ADDITEMS on a non-set")),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Set(items));
                    self.push(v);
                }
                // PUT, BINPUT, LONG_BINPUT, MEMOIZE
                b'p' => {
                    let line = self.line()?;
                    let key = line.parse().map_err(|_| self.err(format!("bad memo key {line:?}")))?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = self.u8()?;
                    self.memo_put(key.into())?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = u32::try_from(self.memo.len()).map_err(|_| self.err("memo full"))?;
                    self.memo_put(key)?;
                }
                // GET, BINGET, LONG_BINGET
                b'g' => {
                    let line = self.line()?;
                    let key = line.parse().map_err(|_| self.err(format!("bad memo key {line:?}")))?;
                    let v = self.memo_get(key)?;
                    self.push(v);
                }
                b'h' => {
                    let key = self.u8()?;
                    let v = self.memo_get(key.into())?;
                    self.push(v);
                }
                b'j' => {
                    let key = self.u32()?;
                    let v = self.memo_get(key)?;
                    self.push(v);
                }
                // GLOBAL, STACK_GLOBAL: resolved against the allow-list right here, so a forbidden name never
                // reaches REDUCE.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = resolve_global(module, name)?;
                    let v = self.alloc(Obj::Global(g));
                    self.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let g = resolve_global(&module, &name)?;
                    let v = self.alloc(Obj::Global(g));
                    self.push(v);
                }
                // REDUCE
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let g = self.global(&func).ok_or_else(|| self.err("REDUCE of a non-callable"))?;
                    let args = self.tuple_items(&args)?;
                    let v = self.call(g, args)?;
                    self.push(v);
                }
                // NEWOBJ, NEWOBJ_EX
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs: none of the allow-listed classes take any that matter
                    }
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match self.global(&cls) {
                        Some(Global::OrderedDict) => self.alloc(Obj::Dict(Vec::new())),
                        Some(Global::Set) | Some(Global::FrozenSet) => self.alloc(Obj::Set(Vec::new())),
                        Some(Global::Namespace) => self.alloc(Obj::Opaque("argparse.Namespace")),
                        _ => return Err(self.err("NEWOBJ of a class that cannot be instantiated")),
                    };
                    self.push(v);
                }
                // BUILD: sets instance state. The only objects that get any are containers and tensors carrying
                // Python attributes (`state_dict._metadata`, Namespace fields), which we do not need.
                b'b' => {
                    let _state = self.pop()?;
                    let target = self.top()?.clone();
                    match self.obj_mut(&target)? {
                        Obj::Dict(_) | Obj::Opaque(_) | Obj::Tensor(_) | Obj::Set(_) => {}
                        _ => return Err(self.err("BUILD on an object without state")),
                    }
                }
                // BINPERSID: torch's storage references.
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(&pid)?;
                    let v = self.alloc(Obj::Storage(storage));
                    self.push(v);
                }
                other => return Err(self.err(format!("unsupported opcode 0x{other:02x}"))),
            }
        }
    }

    /// Interprets an allow-listed callable. Nothing here executes Python; each arm builds a description.
    fn call(&mut self, g: Global, args: Vec<Value>) -> Result<Value, WeightsError> {
        match g {
            Global::OrderedDict => {
                let mut items = Vec::new();
                if let Some(src) = args.first() {
                    for pair in self.tuple_items(src)? {
                        let kv = self.tuple_items(&pair)?;
                        let [k, v] =
                            <[Value; 2]>::try_from(kv).map_err(|_| self.err("OrderedDict item is not a pair"))?;
                        items.push((k, v));
                    }
                }
                Ok(self.alloc(Obj::Dict(items)))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let min = match g {
                    Global::RebuildTensor => 4,
                    Global::RebuildTensorV2 => 6,
                    _ => 7,
                };
                if args.len() < min || args.len() > min + 1 {
                    return Err(self.err(format!("{g:?} takes {min} arguments, got {}", args.len())));
                }
                let storage = match self.obj(&args[0]) {
                    Some(Obj::Storage(s)) => s.clone(),
                    _ => return Err(self.err("tensor storage is not a persistent storage")),
                };
                let offset = self.uint(&args[1], "storage offset")?;
                let size = self.uints(&args[2], "size")?;
                let stride = self.uints(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(self.err("tensor size and stride differ in length"));
                }
                let dtype = if g == Global::RebuildTensorV3 {
                    match self.global(&args[6]) {
                        Some(Global::Dtype(d)) => d,
                        _ => {
                            return Err(self.err("_rebuild_tensor_v3 dtype is not a known torch dtype"));
                        }
                    }
                } else {
                    storage.dtype
                };
                if dtype != storage.dtype {
                    // v3 reinterprets an untyped (byte) storage; only that case is well defined.
                    if storage.dtype != DType::U8 {
                        return Err(self.err("tensor dtype differs from its typed storage"));
                    }
                }
                Ok(self.alloc(Obj::Tensor(TensorRef { storage, dtype, offset, size, stride })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let data = args.into_iter().next().ok_or_else(|| self.err("_rebuild_parameter without data"))?;
                match self.obj(&data) {
                    Some(Obj::Tensor(_)) => Ok(data),
                    _ => Err(self.err("_rebuild_parameter of a non-tensor")),
                }
            }
            Global::RebuildFromTypeV2 => {
                let [func, new_type, inner, _state] =
                    <[Value; 4]>::try_from(args).map_err(|_| self.err("_rebuild_from_type_v2 takes 4 arguments"))?;
                if self.global(&new_type) != Some(Global::TensorType) {
                    return Err(self.err("_rebuild_from_type_v2 of a type other than Tensor/Parameter"));
                }
                let g = self.global(&func).ok_or_else(|| self.err("_rebuild_from_type_v2 of a non-callable"))?;
                if !matches!(g, Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3) {
                    return Err(self.err("_rebuild_from_type_v2 of a non-tensor rebuild function"));
                }
                let inner = self.tuple_items(&inner)?;
                self.call(g, inner)
            }
            Global::CodecsEncode => {
                let (Some(Value::Str(s)), Some(Value::Str(enc))) = (args.first(), args.get(1)) else {
                    return Err(self.err("_codecs.encode needs (str, encoding)"));
                };
                let bytes: Vec<u8> = match enc.to_ascii_lowercase().as_str() {
                    "latin1" | "latin-1" | "iso-8859-1" => s
                        .chars()
                        .map(|c| u8::try_from(u32::from(c)).map_err(|_| self.err("non-latin-1 character")))
                        .collect::<Result<_, _>>()?,
                    "utf-8" | "utf8" | "ascii" => s.as_bytes().to_vec(),
                    other => return Err(self.err(format!("unsupported codec {other:?}"))),
                };
                Ok(Value::Bytes(bytes.into()))
            }
            Global::TorchSize => {
                let items = match args.first() {
                    Some(v) => self.tuple_items(v)?,
                    None => Vec::new(),
                };
                Ok(self.alloc(Obj::Tuple(items)))
            }
            Global::Set | Global::FrozenSet => {
                let items = match args.first() {
                    Some(v) => self.tuple_items(v)?,
                    None => Vec::new(),
                };
                Ok(self.alloc(Obj::Set(items)))
            }
            Global::TensorType | Global::StorageType(_) | Global::Dtype(_) | Global::Namespace => {
                Err(self.err(format!("{g:?} is not callable here")))
            }
        }
    }

    fn uint(&self, v: &Value, what: &str) -> Result<u64, WeightsError> {
        match v {
            Value::Int(i) => u64::try_from(*i).map_err(|_| self.err(format!("negative {what}"))),
            _ => Err(self.err(format!("{what} is not an integer"))),
        }
    }

    fn uints(&self, v: &Value, what: &str) -> Result<Vec<u64>, WeightsError> {
        let items = self.tuple_items(v)?;
        if items.len() > MAX_NDIM {
            return Err(self.err(format!("tensor {what} has {} dimensions", items.len())));
        }
        items.iter().map(|i| self.uint(i, what)).collect()
    }

    /// torch's persistent ids: `('storage', storage_type, key, location, numel[, view_metadata])`.
    fn persistent_load(&self, pid: &Value) -> Result<StorageRef, WeightsError> {
        let items = self.tuple_items(pid)?;
        if !(5..=6).contains(&items.len()) {
            return Err(self.err(format!("persistent id has {} fields", items.len())));
        }
        match &items[0] {
            Value::Str(s) if &**s == "storage" => {}
            _ => return Err(self.err("persistent id is not a storage")),
        }
        let dtype = match self.global(&items[1]) {
            Some(Global::StorageType(d)) => d,
            _ => return Err(self.err("persistent id names no storage type")),
        };
        let key = match &items[2] {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string().into(),
            _ => return Err(self.err("storage key is not a string")),
        };
        let numel = self.uint(&items[4], "storage size")?;
        let view = match items.get(5) {
            None | Some(Value::None) => None,
            Some(v) => {
                let m = self.tuple_items(v)?;
                if m.len() != 3 {
                    return Err(self.err("storage view metadata is not (key, offset, size)"));
                }
                Some((self.uint(&m[1], "view offset")?, self.uint(&m[2], "view size")?))
            }
        };
        Ok(StorageRef { key, dtype, numel, view })
    }
}

fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

/// Little-endian two's complement, as LONG1/LONG4 encode it.
fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0 };
    // Fits in i64 when every byte past the eighth is pure sign extension of the eighth's top bit.
    let fits = b.len() <= 8 || (b[8..].iter().all(|&x| x == fill) && ((b[7] & 0x80 != 0) == negative));
    if fits {
        let mut a = [fill; 8];
        let n = b.len().min(8);
        a[..n].copy_from_slice(&b[..n]);
        Value::Int(i64::from_le_bytes(a))
    } else {
        Value::BigInt(b.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &[u8]) -> Result<Unpickled, WeightsError> {
        unpickle(p, 0)
    }

    #[test]
    fn decodes_longs() {
        assert!(matches!(decode_long(&[]), Value::Int(0)));
        assert!(matches!(decode_long(&[0xff]), Value::Int(-1)));
        assert!(matches!(decode_long(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(decode_long(&[0xe9, 0x03, 0, 0, 0, 0, 0, 0, 0]), Value::Int(1001)));
        assert!(matches!(decode_long(&[1, 0, 0, 0, 0, 0, 0, 0, 1]), Value::BigInt(_)));
    }

    #[test]
    fn builds_a_dict_with_shared_memo_entries() {
        // {'a': [1, 2], 'b': <same list>} with the list appended to after being memoized.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01K\x02eX\x01\x00\x00\x00bh\x02u.";
        let u = run(p).unwrap();
        let d = u.dict(&u.root).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(u.list(&d[0].1).unwrap().len(), 2);
        assert_eq!(u.list(&d[1].1).unwrap().len(), 2, "memo must share, not copy");
    }

    #[test]
    fn refuses_unknown_globals_by_name() {
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85R.";
        match run(p) {
            Err(WeightsError::ForbiddenGlobal { module, name }) => {
                assert_eq!((module.as_str(), name.as_str()), ("posix", "system"))
            }
            other => panic!("expected ForbiddenGlobal, got {other:?}"),
        }
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(matches!(run(p), Err(WeightsError::ForbiddenGlobal { .. })));
    }

    #[test]
    fn self_referencing_lists_are_harmless() {
        // l = []; l.append(l)
        let p = b"\x80\x02]q\x00h\x00a.";
        let u = run(p).unwrap();
        assert_eq!(u.list(&u.root).unwrap().len(), 1);
    }

    #[test]
    fn repeated_copies_of_a_big_list_hit_the_work_budget() {
        // l = [None] * 20000, then set(l) 2000 times: 40M copied elements from a 30 kB pickle.
        let mut p = b"\x80\x02cbuiltins\nset\nq\x00](".to_vec();
        p.extend(std::iter::repeat_n(b'N', 20_000));
        p.extend_from_slice(b"eq\x01");
        for _ in 0..2_000 {
            p.extend_from_slice(b"h\x00h\x01\x85R0");
        }
        p.extend_from_slice(b"N.");
        match run(&p) {
            Err(WeightsError::Pickle { reason, .. }) => {
                assert!(reason.contains("amplification"), "{reason}")
            }
            other => panic!("expected the work budget to trip, got {other:?}"),
        }
        // The same with 20 calls is fine.
        let mut ok = b"\x80\x02cbuiltins\nset\nq\x00](".to_vec();
        ok.extend(std::iter::repeat_n(b'N', 20_000));
        ok.extend_from_slice(b"eq\x01");
        for _ in 0..20 {
            ok.extend_from_slice(b"h\x00h\x01\x85R0");
        }
        ok.extend_from_slice(b"N.");
        assert!(run(&ok).is_ok());
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        for p in [
            &b""[..],
            b"\x80",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x02h\x05.",
            b"\x80\x02t.",
            b"\x80\x02a.",
            b"\x80\x02K\x01K\x02s.",
            b"\x80\x02\x85.",
            b"\x80\x02c\xff\n\n.",
            b"\x80\x02(((((1111111.",
            b"\x80\x02\x8b\xff\xff\xff\xff.",
            b"\x80\x02\xfe.",
        ] {
            assert!(run(p).is_err(), "{p:?}");
        }
    }
}
