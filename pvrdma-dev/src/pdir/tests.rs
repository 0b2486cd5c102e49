use super::*;
use vm_memory::GuestMemoryMmap;

const MEM_SIZE: usize = 16 << 20;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Lays out a directory at 0x1000, tables from 0x2000, data pages from `data`.
/// Returns the page addresses.
fn build(m: &GuestMemoryMmap, npages: u32, data: u64) -> Vec<u64> {
    let ntables = ((npages - 1) >> 9) + 1;
    let pages: Vec<u64> = (0..npages as u64).map(|i| data + i * PAGE_SIZE).collect();
    for t in 0..ntables as u64 {
        let table = 0x2000 + t * PAGE_SIZE;
        m.write_obj(table, GuestAddress(0x1000 + t * 8)).unwrap();
        for j in 0..512u64 {
            let i = t * 512 + j;
            if let Some(p) = pages.get(i as usize) {
                m.write_obj(*p, GuestAddress(table + j * 8)).unwrap();
            }
        }
    }
    pages
}

#[test]
fn load_small_and_translate() {
    let m = mem();
    let pages = build(&m, 4, 0x10_0000);
    let pd = PageDir::load(&m, 0x1000, 4).unwrap();
    assert_eq!(pd.len(), 4);
    assert!(!pd.is_empty());
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(pd.page(i), Some(GuestAddress(*p)));
    }
    assert_eq!(pd.page(4), None);
    assert_eq!(pd.translate(0x1234), Some(GuestAddress(0x10_1234)));
    assert_eq!(pd.translate(4 * PAGE_SIZE), None);
    assert_eq!(pd.translate(u64::MAX), None);
}

#[test]
fn load_multi_table() {
    let m = mem();
    // 513 pages need 2 tables; the last page comes from the second table.
    build(&m, 513, 0x40_0000);
    let pd = PageDir::load(&m, 0x1000, 513).unwrap();
    assert_eq!(pd.len(), 513);
    assert_eq!(
        pd.page(512),
        Some(GuestAddress(0x40_0000 + 512 * PAGE_SIZE))
    );
}

#[test]
fn bad_counts() {
    let m = mem();
    build(&m, 1, 0x10_0000);
    assert!(matches!(
        PageDir::load(&m, 0x1000, 0),
        Err(Error::BadCount(0))
    ));
    assert!(matches!(
        PageDir::load(&m, 0x1000, MAX_PAGES + 1),
        Err(Error::BadCount(_))
    ));
    assert!(matches!(
        PageDir::load(&m, 0x1000, u32::MAX),
        Err(Error::BadCount(_))
    ));
}

#[test]
fn bad_directory() {
    let m = mem();
    build(&m, 1, 0x10_0000);
    assert!(matches!(
        PageDir::load(&m, 0, 1),
        Err(Error::NullEntry {
            level: Level::Directory,
            ..
        })
    ));
    assert!(matches!(
        PageDir::load(&m, 0x1008, 1),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        PageDir::load(&m, MEM_SIZE as u64, 1),
        Err(Error::OutOfGuestMemory { .. })
    ));
    assert!(matches!(
        PageDir::load(&m, !0xfffu64, 1),
        Err(Error::OutOfGuestMemory { .. })
    ));
}

#[test]
fn bad_entries() {
    let m = mem();
    build(&m, 600, 0x10_0000);
    // Table 1 missing.
    m.write_obj(0u64, GuestAddress(0x1008)).unwrap();
    assert!(matches!(
        PageDir::load(&m, 0x1000, 600),
        Err(Error::NullEntry {
            level: Level::Table,
            index: 1
        })
    ));
    // Only 512 pages needs one table: the zero entry is not read.
    assert!(PageDir::load(&m, 0x1000, 512).is_ok());
    // A zero page entry.
    m.write_obj(0u64, GuestAddress(0x2000 + 7 * 8)).unwrap();
    assert!(matches!(
        PageDir::load(&m, 0x1000, 8),
        Err(Error::NullEntry {
            level: Level::Page,
            index: 7
        })
    ));
    assert!(PageDir::load(&m, 0x1000, 7).is_ok());
    // Unaligned page entry.
    m.write_obj(0x10_0010u64, GuestAddress(0x2000)).unwrap();
    assert!(matches!(
        PageDir::load(&m, 0x1000, 1),
        Err(Error::Unaligned {
            level: Level::Page,
            ..
        })
    ));
    // Page outside memory, and the last page partly outside.
    m.write_obj(MEM_SIZE as u64, GuestAddress(0x2000)).unwrap();
    assert!(matches!(
        PageDir::load(&m, 0x1000, 1),
        Err(Error::OutOfGuestMemory { .. })
    ));
    m.write_obj(!0xfffu64, GuestAddress(0x2000)).unwrap();
    assert!(matches!(
        PageDir::load(&m, 0x1000, 1),
        Err(Error::OutOfGuestMemory { .. })
    ));
    // Table pointing outside memory.
    m.write_obj(0xffff_f000u64, GuestAddress(0x1000)).unwrap();
    assert!(matches!(
        PageDir::load(&m, 0x1000, 1),
        Err(Error::OutOfGuestMemory {
            level: Level::Table,
            ..
        })
    ));
}

#[test]
fn max_pages_stays_in_directory() {
    // MAX_PAGES reads exactly 512 directory entries; all zero here → the first table fails,
    // and nothing past the directory page is touched.
    let m = mem();
    assert!(matches!(
        PageDir::load(&m, 0x1000, MAX_PAGES),
        Err(Error::NullEntry {
            level: Level::Table,
            index: 0
        })
    ));
}

#[test]
fn read_write_across_pages() {
    let m = mem();
    // Non-contiguous pages: page 0 at 0x30_0000, page 1 at 0x10_0000.
    let pd = PageDir::from_pages(vec![GuestAddress(0x30_0000), GuestAddress(0x10_0000)].into());
    let data: Vec<u8> = (0..100u8).collect();
    pd.write_at(&m, 4096 - 50, &data).unwrap();
    let mut a = [0u8; 50];
    m.read_slice(&mut a, GuestAddress(0x30_0000 + 4096 - 50))
        .unwrap();
    assert_eq!(&a[..], &data[..50]);
    m.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&a[..], &data[50..]);
    let mut back = vec![0u8; 100];
    pd.read_at(&m, 4096 - 50, &mut back).unwrap();
    assert_eq!(back, data);

    pd.write_obj(&m, 4096 - 4, &0x1122_3344_5566_7788u64)
        .unwrap();
    assert_eq!(
        pd.read_obj::<u64, _>(&m, 4096 - 4).unwrap(),
        0x1122_3344_5566_7788
    );

    // Whole range, empty access at the end, and out of range.
    let mut all = vec![0u8; 8192];
    pd.read_at(&m, 0, &mut all).unwrap();
    pd.read_at(&m, 8192, &mut []).unwrap();
    assert!(matches!(
        pd.read_at(&m, 8190, &mut [0u8; 4]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        pd.read_at(&m, u64::MAX, &mut [0u8; 4]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        pd.read_obj::<u32, _>(&m, u64::MAX - 1),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn unmapped_after_load_is_an_error() {
    let m = mem();
    build(&m, 2, 0x10_0000);
    let pd = PageDir::load(&m, 0x1000, 2).unwrap();
    // The VMM replaces guest memory with a smaller map: accesses report errors.
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_1000)]).unwrap();
    assert!(pd.read_obj::<u32, _>(&small, 0).is_ok());
    assert!(matches!(
        pd.read_obj::<u32, _>(&small, 4096),
        Err(Error::Memory(_))
    ));
    assert!(matches!(
        pd.write_at(&small, 4000, &[0u8; 200]),
        Err(Error::Memory(_))
    ));
    // Garbage pages from from_pages near the top of the address space never panic.
    let pd = PageDir::from_pages(vec![GuestAddress(u64::MAX - 10)].into());
    assert!(pd.translate(100).is_none());
    assert!(pd.read_at(&small, 0, &mut [0u8; 8]).is_err());
    assert!(pd.read_at(&small, 100, &mut [0u8; 8]).is_err());
}

#[test]
fn a_page_split_between_two_regions_is_read_and_written_whole() {
    // Regions [0, 0x1800) and [0x1800, 0x4000): page 0x1000 lies in both, so no single slice
    // of the backing memory holds it and the general path must do the access.
    let m = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x1800),
        (GuestAddress(0x1800), 0x2800),
    ])
    .unwrap();
    let pd = PageDir::from_pages(vec![GuestAddress(0x3000), GuestAddress(0x1000)].into());
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 5) as u8).collect();
    pd.write_at(&m, 4096, &data).unwrap();
    let mut back = vec![0u8; 4096];
    m.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
    assert!(back == data);
    // Across the page boundary of the directory: the end of page 0 and the split page.
    let mut got = vec![0u8; 1024];
    pd.read_at(&m, 4096 - 512, &mut got).unwrap();
    let mut want = vec![0u8; 512];
    m.read_slice(&mut want, GuestAddress(0x3000 + 4096 - 512))
        .unwrap();
    want.extend_from_slice(&data[..512]);
    assert!(got == want);
    pd.write_obj(&m, 4096 + 0x7fe, &0xa5a5_5a5au32).unwrap();
    assert_eq!(
        pd.read_obj::<u32, _>(&m, 4096 + 0x7fe).unwrap(),
        0xa5a5_5a5a
    );
}
