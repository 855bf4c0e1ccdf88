//! Binding attribute values to the root variables (`request`, `auth`, ...) an expression sees:
//! the map-key trees are built at configure time, the values filled in per request.

use crate::attributes::Attribute;
use cel_interpreter::objects::{Key, Map};
use cel_interpreter::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// How one root variable (`request`, `auth`, ...) of an expression is built from the
/// attributes it reads: a tree of map keys, allocated once at configure time, with attribute
/// indices at its nodes.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Binding {
    /// The root variable's name: one of the attribute roots.
    pub(super) name: String,
    /// The keys below the root (the root itself has no attribute).
    node: BindNode,
}

/// One node of a [`Binding`]'s tree: a map key's value, built from an attribute, from the
/// entries below it, or both.
#[derive(Debug, Clone, PartialEq, Default)]
struct BindNode {
    /// The attribute whose value this node holds, if any.
    attribute: Option<usize>,
    /// Map entries, when the node is a map.
    children: Vec<(Arc<String>, BindNode)>,
}

impl BindNode {
    /// Records that `attribute` sits at `path` below this node, creating the keys on the way.
    fn insert(&mut self, path: &[String], attribute: usize) {
        let Some((first, rest)) = path.split_first() else {
            self.attribute = Some(attribute);
            return;
        };
        let pos = match self.children.iter().position(|(k, _)| **k == *first) {
            Some(p) => p,
            None => {
                self.children
                    .push((Arc::new(first.clone()), BindNode::default()));
                self.children.len() - 1
            }
        };
        if let Some((_, child)) = self.children.get_mut(pos) {
            child.insert(rest, attribute);
        }
    }

    /// The node's value: a map of the entries whose values are there, or, when none is, the
    /// attribute's own value (a longer path wins over a shorter one).
    fn build(&self, values: &[Option<Option<Value>>]) -> Option<Value> {
        if !self.children.is_empty() {
            let map = self.map(values);
            if !map.is_empty() {
                return Some(Value::Map(Map { map: Arc::new(map) }));
            }
        }
        self.attribute
            .and_then(|i| values.get(i).cloned().flatten().flatten())
    }

    /// The entries of this node whose values are there (`values` per attribute: `None` not
    /// fetched, `Some(None)` absent).
    fn map(&self, values: &[Option<Option<Value>>]) -> HashMap<Key, Value> {
        let mut map = HashMap::with_capacity(self.children.len());
        for (key, child) in &self.children {
            if let Some(v) = child.build(values) {
                map.insert(Key::String(key.clone()), v);
            }
        }
        map
    }
}

impl Binding {
    /// The root variables an expression reading `indices` sees, in order of first use.
    pub(super) fn for_expression(indices: &[usize], attributes: &[Attribute]) -> Vec<Binding> {
        let mut out: Vec<Binding> = Vec::new();
        for &i in indices {
            let Some((root, rest)) = attributes.get(i).and_then(|a| a.cel_path.split_first())
            else {
                continue;
            };
            let pos = match out.iter().position(|b| b.name == *root) {
                Some(p) => p,
                None => {
                    out.push(Binding {
                        name: root.clone(),
                        node: BindNode::default(),
                    });
                    out.len() - 1
                }
            };
            if let Some(b) = out.get_mut(pos) {
                b.node.insert(rest, i);
            }
        }
        out
    }

    /// The root variable's value: the attribute bound to the root itself (`auth`: the whole
    /// identity Struct), else a map of the entries whose values are there; an empty map when
    /// nothing is there.
    pub(super) fn build(&self, values: &[Option<Option<Value>>]) -> Value {
        self.node.build(values).unwrap_or_else(|| {
            Value::Map(Map {
                map: Arc::new(HashMap::new()),
            })
        })
    }
}
