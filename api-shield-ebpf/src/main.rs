//! The daemon's program object: the library's XDP and TC hooks and their maps.
#![no_std]
#![no_main]

use api_shield_ebpf as _;
