//! The flag sets stored in map values ([`crate::IpcacheFlags`],
//! [`crate::ServiceFlags`]): one `u32` of bits whose values are the C
//! header's `*_F_*` constants, defined by one macro so that every set has
//! the same small API.

/// Defines a flag set: a `u32` newtype with `NONE`, the given flag
/// constants, `bits`, `from_bits`, `contains` and `|`. Unknown bits are kept
/// by `from_bits`, so a newer writer's entries survive a read-modify-write
/// by an older agent.
macro_rules! flag_set {
    (
        $(#[$meta:meta])*
        pub struct $name:ident;
        $( $(#[$flag_meta:meta])* $flag:ident = $bits:expr; )*
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u32);

        impl $name {
            /// No flags.
            pub const NONE: Self = Self(0);
            $( $(#[$flag_meta])* pub const $flag: Self = Self($bits); )*

            /// The raw bits as stored in the map.
            pub const fn bits(self) -> u32 {
                self.0
            }

            /// Flags from raw bits (unknown bits are kept).
            pub const fn from_bits(bits: u32) -> Self {
                Self(bits)
            }

            /// Whether every flag of `other` is set.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                Self(self.0 | rhs.0)
            }
        }
    };
}

pub(crate) use flag_set;
