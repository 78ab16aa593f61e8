import CairnCore

/// A VMDK text descriptor: `key=value` lines (`version`, `CID`, `parentCID`, `createType`,
/// `parentFileNameHint`, `ddb.*`) and extent lines
///
///     ACCESS SECTORS TYPE ["FILE" [OFFSET]]
///
/// with ACCESS `RW`, `RDONLY` or `NOACCESS`, TYPE `SPARSE`, `FLAT`, `ZERO`, `VMFS`,
/// `VMFSSPARSE`, `SESPARSE`, `VMFSRDM`, `VMFSRAW`, and OFFSET (sectors, flat extents only).
/// It is either a file of its own or embedded in a sparse extent (sectors
/// `descriptorOffset ..< descriptorOffset + descriptorSize`, NUL-padded).
struct VMDKDescriptor: Sendable {
    enum Access: String, Sendable {
        case readWrite = "RW"
        case readOnly = "RDONLY"
        case noAccess = "NOACCESS"
    }

    struct ExtentLine: Sendable {
        var access: Access
        var sectors: UInt64
        var type: String
        var fileName: String?
        var offset: UInt64?
        /// 1-based line number in the descriptor, for messages.
        var lineNumber: Int
    }

    /// `key=value` fields, value without surrounding quotes; the first occurrence wins.
    var fields: [String: String] = [:]
    var extents: [ExtentLine] = []

    var createType: String? { fields["createType"] }

    /// Whether the descriptor describes a child (differencing) disk, and its parent's name.
    var parentDescription: String? {
        if let hint = fields["parentFileNameHint"] { return "'\(hint)'" }
        if let cid = fields["parentCID"], cid.lowercased() != "ffffffff" { return "with parentCID \(cid)" }
        return nil
    }

    /// Parses descriptor text. With `parseExtents` false (embedded descriptors, where the
    /// extent is the file itself), extent lines are skipped without checks.
    static func parse(_ bytes: ArraySlice<UInt8>, parseExtents: Bool, path: String) throws -> VMDKDescriptor {
        var out = VMDKDescriptor()
        var lineNumber = 0
        for rawLine in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = trim(rawLine)
            guard let first = line.first, first != UInt8(ascii: "#") else { continue }
            let firstWord = line.prefix { !isSpace($0) }
            if let access = Access(rawValue: String(decoding: firstWord, as: UTF8.self)), firstWord.count < line.count {
                guard parseExtents else { continue }
                guard out.extents.count < VMDK.maxExtents else {
                    throw CairnError(.malformedImage, "VMDK descriptor lists more than \(VMDK.maxExtents) extents", path: path)
                }
                out.extents.append(try parseExtent(line, access: access, lineNumber: lineNumber, path: path))
                continue
            }
            if let eq = line.firstIndex(of: UInt8(ascii: "=")) {
                let key = String(decoding: trim(line[line.startIndex..<eq]), as: UTF8.self)
                var value = trim(line[(eq + 1)...])
                if value.count >= 2, value.first == UInt8(ascii: "\""), value.last == UInt8(ascii: "\"") {
                    value = value.dropFirst().dropLast()
                }
                if !key.isEmpty, out.fields[key] == nil { out.fields[key] = String(decoding: value, as: UTF8.self) }
            }
            // Anything else is ignored, as QEMU and VMware do.
        }
        return out
    }

    private static func parseExtent(_ line: ArraySlice<UInt8>, access: Access, lineNumber: Int, path: String) throws -> ExtentLine {
        var i = line.startIndex
        func invalid(_ why: String) -> CairnError {
            let text = String(decoding: line.prefix(200), as: UTF8.self)
            return CairnError(.malformedImage, "VMDK descriptor line \(lineNumber) is not a valid extent line (\(why)): \(text)", path: path)
        }
        func skipSpaces() { while i < line.endIndex, isSpace(line[i]) { i += 1 } }
        func word() -> ArraySlice<UInt8> {
            let start = i
            while i < line.endIndex, !isSpace(line[i]) { i += 1 }
            return line[start..<i]
        }
        func number(_ what: String) throws -> UInt64 {
            let digits = word()
            guard !digits.isEmpty, digits.count <= 20, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                  let value = UInt64(String(decoding: digits, as: UTF8.self)) else {
                throw invalid("\(what) is not a number")
            }
            return value
        }
        _ = word()  // access, already known
        skipSpaces()
        let sectors = try number("the sector count")
        skipSpaces()
        let type = String(decoding: word(), as: UTF8.self)
        guard !type.isEmpty else { throw invalid("no extent type") }
        skipSpaces()
        var fileName: String?
        var offset: UInt64?
        if i < line.endIndex {
            guard line[i] == UInt8(ascii: "\"") else { throw invalid("the file name must be in double quotes") }
            i += 1
            let start = i
            while i < line.endIndex, line[i] != UInt8(ascii: "\"") { i += 1 }
            guard i < line.endIndex else { throw invalid("unterminated file name") }
            fileName = String(decoding: line[start..<i], as: UTF8.self)
            i += 1
            skipSpaces()
            if i < line.endIndex {
                offset = try number("the offset")
                skipSpaces()
                guard i == line.endIndex else { throw invalid("unexpected text after the offset") }
            }
        }
        return ExtentLine(access: access, sectors: sectors, type: type, fileName: fileName, offset: offset, lineNumber: lineNumber)
    }

    private static func isSpace(_ b: UInt8) -> Bool { b == 0x20 || b == 0x09 || b == 0x0D }

    private static func trim(_ s: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        var s = s
        while let f = s.first, isSpace(f) { s = s.dropFirst() }
        while let l = s.last, isSpace(l) { s = s.dropLast() }
        return s
    }

    /// Checks that an extent file name is a plain file name (no directory part), so a
    /// descriptor can never name a file outside its own directory.
    static func checkPlainFileName(_ name: String, lineNumber: Int, path: String) throws {
        let bad = name.isEmpty || name == "." || name == ".." || name.contains("/") || name.contains("\\")
            || name.utf8.contains(0)
        if bad {
            let shown = String(name.unicodeScalars.prefix(200).map { $0 == "\0" ? "\u{FFFD}" : Character($0) })
            throw CairnError(.malformedImage,
                             "descriptor extent file name '\(shown)' (line \(lineNumber)) is not a plain file name; extent files must sit next to the descriptor",
                             path: path,
                             hint: "Cairn never follows paths from inside an image; fix the descriptor so each extent line names a file in its own directory")
        }
    }

    /// The descriptor our writers embed: one sparse extent of `capacity` sectors.
    static func render(createType: String, capacity: UInt64, extentFileName: String, cid: UInt32) -> String {
        // BIOS geometry as QEMU writes it for SCSI adapters (informational only).
        let cylinders = min(65535, capacity / (255 * 63))
        let cidText = String(cid, radix: 16)
        let paddedCID = String(repeating: "0", count: max(0, 8 - cidText.count)) + cidText
        return """
        # Disk DescriptorFile
        version=1
        CID=\(paddedCID)
        parentCID=ffffffff
        createType="\(createType)"

        # Extent description
        RW \(capacity) SPARSE "\(extentFileName)"

        # The Disk Data Base
        #DDB

        ddb.virtualHWVersion = "4"
        ddb.geometry.cylinders = "\(cylinders)"
        ddb.geometry.heads = "255"
        ddb.geometry.sectors = "63"
        ddb.adapterType = "lsilogic"

        """
    }

    /// The last path component of `path`, with characters a descriptor cannot hold replaced.
    static func extentFileName(for path: String) -> String {
        let last = path.split(separator: "/").last.map(String.init) ?? ""
        let cleaned = String(last.map { ($0 == "\"" || $0 == "\n" || $0 == "\r" || $0 == "\0") ? "_" : $0 })
        return cleaned.isEmpty ? "disk.vmdk" : cleaned
    }
}
