//! A client's session as a handler sees it: a JSON object that remembers
//! what it was, so that only the keys the handler changed are written back.
//! Two workers changing different keys of one client never lose each
//! other's writes (GatewayWorker writes the whole session back).

use serde_json::{Map, Value};

/// The session of the client an event is about.
#[derive(Debug, Clone, Default)]
pub struct Session {
    original: Map<String, Value>,
    current: Map<String, Value>,
}

impl Session {
    pub(crate) fn from_bytes(b: &[u8]) -> Self {
        let map = if b.is_empty() {
            Map::new()
        } else {
            match serde_json::from_slice(b) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            }
        };
        Session {
            original: map.clone(),
            current: map,
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.current.get(key)
    }

    /// Sets `key`; written back to the gateway after the handler returns.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.current.insert(key.into(), value.into());
    }

    /// Removes `key`; written back after the handler returns.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.current.remove(key)
    }

    /// The whole session.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.current
    }

    /// Keys set or changed, and keys removed, since the event arrived.
    pub(crate) fn changes(&self) -> Option<(Map<String, Value>, Vec<String>)> {
        let set: Map<String, Value> = self
            .current
            .iter()
            .filter(|(k, v)| self.original.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let removed: Vec<String> = self
            .original
            .keys()
            .filter(|k| !self.current.contains_key(*k))
            .cloned()
            .collect();
        (!set.is_empty() || !removed.is_empty()).then_some((set, removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_keys_are_written_back() {
        let mut s = Session::from_bytes(br#"{"a":1,"b":2,"c":3}"#);
        assert!(s.changes().is_none());
        s.insert("a", 1); // unchanged value: not a change
        s.insert("b", 20);
        s.insert("d", "new");
        s.remove("c");
        let (set, removed) = s.changes().unwrap();
        assert_eq!(
            serde_json::Value::Object(set),
            serde_json::json!({"b":20,"d":"new"})
        );
        assert_eq!(removed, vec!["c".to_string()]);
    }
}
