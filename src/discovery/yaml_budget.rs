//! A YAML document read into a `serde_yaml::Value` under a budget of values, so that
//! aliases cannot expand a small file into a huge tree. serde_yaml limits how often
//! aliases are followed, not how much each one brings: `a: &a [x × 30 000]` and
//! `b: [*a × 1 000]` is 92 KiB of text and 30 million values. Here every value counts,
//! each time an alias repeats it, and the document is refused once the budget is spent.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};

/// How many values a text may expand to, for each of its bytes, and at the least. No
/// document without aliases comes near: every value takes a byte or more of text, and
/// Kubernetes objects as `kubectl` prints them hold about one value per 10 bytes.
pub(crate) const VALUES_PER_BYTE: usize = 1;
pub(crate) const MIN_VALUES: usize = 4096;

/// The budget for a text of `len` bytes.
pub(crate) fn budget_for(len: usize) -> Cell<usize> {
    Cell::new(len.saturating_mul(VALUES_PER_BYTE).max(MIN_VALUES))
}

/// Reads one document into a value, spending one unit of `budget` for each value (a
/// scalar, a sequence, a mapping) it holds once its aliases are expanded.
pub(crate) fn value<'de, D: Deserializer<'de>>(
    doc: D,
    budget: &Cell<usize>,
) -> Result<Value, D::Error> {
    Budgeted(budget).deserialize(doc)
}

#[derive(Clone, Copy)]
struct Budgeted<'b>(&'b Cell<usize>);

impl Budgeted<'_> {
    fn spend<E: de::Error>(self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "expands to more values than the file has bytes (aliases count each time \
                 they are used; at most {VALUES_PER_BYTE} value a byte, {MIN_VALUES} at the least)"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budgeted<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budgeted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.spend()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.spend()?;
        let mut mapping = Mapping::new();
        while let Some(key) = map.next_key_seed(self)? {
            if mapping.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate entry with key {}",
                    crate::discovery::convert::excerpt(&key_text(&key))
                )));
            }
            let value = map.next_value_seed(self)?;
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        use serde::de::VariantAccess as _;
        self.spend()?;
        let (tag, contents) = data.variant::<String>()?;
        if tag.is_empty() {
            return Err(de::Error::custom("an empty YAML tag"));
        }
        let value = contents.newtype_variant_seed(self)?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

/// A mapping key as a message shows it.
fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn read(text: &str) -> Result<Vec<Value>, serde_yaml::Error> {
        let budget = budget_for(text.len());
        serde_yaml::Deserializer::from_str(text)
            .map(|doc| value(doc, &budget))
            .collect()
    }

    #[test]
    fn documents_read_as_serde_yaml_reads_them() {
        let text =
            "a: 1\nb: [x, 2.5, true, null, ~]\nc: {d: e}\nf: !custom 3\n---\n- &x {k: v}\n- *x\n";
        let ours = read(text).unwrap();
        let theirs: Vec<Value> = serde_yaml::Deserializer::from_str(text)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn aliases_count_each_time_they_are_used() {
        // 300 values under an anchor, repeated 300 times: 90 000 values from 3 KB.
        let items = vec!["x"; 300].join(", ");
        let uses = vec!["*a"; 300].join(", ");
        let text = format!("a: &a [{items}]\nb: [{uses}]\n");
        let error = read(&text).unwrap_err().to_string();
        assert!(
            error.contains("more values than the file has bytes"),
            "{error}"
        );
        // Used a few times, the same anchor is fine.
        let text = format!("a: &a [{items}]\nb: [*a, *a]\n");
        assert!(read(&text).is_ok());
    }

    #[test]
    fn duplicate_keys_are_refused_naming_the_key() {
        let error = read("a: 1\na: 2\n").unwrap_err().to_string();
        assert!(error.contains("duplicate entry with key \"a\""), "{error}");
    }
}
