import CairnCore

/// A value in LVM2's metadata text format: a signed integer, a real number, a string, or a
/// flat array of those.
package enum LVMConfigValue: Sendable, Equatable {
    case integer(Int64)
    case real(Double)
    case string(String)
    case array([LVMConfigValue])

    package var integer: Int64? {
        if case .integer(let v) = self { return v }
        return nil
    }

    package var string: String? {
        if case .string(let v) = self { return v }
        return nil
    }

    package var array: [LVMConfigValue]? {
        if case .array(let v) = self { return v }
        return nil
    }
}

/// One `key = value` line, with the line it is on (1-based) for messages.
package struct LVMConfigAssignment: Sendable, Equatable {
    package var key: String
    package var value: LVMConfigValue
    package var line: Int
}

/// A `name { ... }` section of LVM2's metadata text: its assignments and subsections, each
/// in file order. The whole text is an unnamed root section.
package struct LVMConfigSection: Sendable, Equatable {
    package var name: String
    package var line: Int
    package var assignments: [LVMConfigAssignment] = []
    package var sections: [LVMConfigSection] = []

    package init(name: String, line: Int) {
        self.name = name
        self.line = line
    }

    /// The first assignment to `key`, or nil.
    package func assignment(_ key: String) -> LVMConfigAssignment? {
        assignments.first { $0.key == key }
    }

    package func value(_ key: String) -> LVMConfigValue? { assignment(key)?.value }

    /// The first subsection called `name`, or nil.
    package func section(_ name: String) -> LVMConfigSection? {
        sections.first { $0.name == name }
    }
}

/// Parser for LVM2's metadata text ("Text Format Volume Group", also `vgcfgbackup` files and
/// lvm.conf): `name { ... }` sections, `key = value` assignments, decimal integers (optionally
/// negative), real numbers, strings in double or single quotes (a backslash takes the next
/// character literally), flat arrays `[ v, v, ... ]` (a trailing comma is allowed) and `#`
/// comments to the end of the line. Bare words in value position are read as strings.
///
/// Hostile text is bounded: at most `maxBytes` of input, `maxDepth` nested sections and
/// `maxItems` assignments, sections and array elements in all. Every error names the line.
package enum LVMConfigText {
    package static let maxBytes = 64 << 20
    package static let maxDepth = 32
    package static let maxItems = 2_000_000

    /// Parses `text` (UTF-8; a NUL ends it, as in a metadata area). `source` names the text in
    /// errors (a PV or file name); `offset` is where the text starts on that PV, when known.
    package static func parse(_ text: [UInt8], source: String = "LVM metadata", offset: UInt64? = nil) throws -> LVMConfigSection {
        var p = Parser(bytes: text, source: source, offset: offset)
        return try p.parseRoot()
    }

    package static func parse(_ text: String, source: String = "LVM metadata") throws -> LVMConfigSection {
        try parse(Array(text.utf8), source: source)
    }

    private enum Token: Equatable {
        case word(String)
        case quoted(String)
        case punct(UInt8)  // { } [ ] = ,
        case end
    }

    private struct Parser {
        let bytes: [UInt8]
        let source: String
        let offset: UInt64?
        var pos = 0
        var line = 1
        var items = 0
        /// One token of look-ahead, with the line it started on.
        var peeked: (Token, Int)?

        init(bytes: [UInt8], source: String, offset: UInt64?) {
            // A NUL ends the text (the on-disk copy is NUL-terminated).
            let end = bytes.firstIndex(of: 0) ?? bytes.count
            self.bytes = Array(bytes[0..<end])
            self.source = source
            self.offset = offset
        }

        func fail(_ message: String, line: Int) -> CairnError {
            CairnError(.malformedImage, "LVM metadata text line \(line): \(message)", path: source, offset: offset,
                       hint: "the volume group metadata is damaged; `vgck` or `vgcfgrestore` on a restored copy may repair it")
        }

        mutating func count(line: Int) throws {
            items += 1
            guard items <= LVMConfigText.maxItems else {
                throw fail("more than \(LVMConfigText.maxItems) items", line: line)
            }
        }

        static func isSpecial(_ b: UInt8) -> Bool {
            switch b {
            case UInt8(ascii: "{"), UInt8(ascii: "}"), UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: "="),
                 UInt8(ascii: ","), UInt8(ascii: "#"), UInt8(ascii: "\""), UInt8(ascii: "'"):
                return true
            default:
                return isSpace(b)
            }
        }

        static func isSpace(_ b: UInt8) -> Bool {
            b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D || b == 0x0B || b == 0x0C
        }

        mutating func next() throws -> (Token, Int) {
            if let p = peeked {
                peeked = nil
                return p
            }
            return try lex()
        }

        mutating func peek() throws -> (Token, Int) {
            if let p = peeked { return p }
            let t = try lex()
            peeked = t
            return t
        }

        mutating func lex() throws -> (Token, Int) {
            // Skip blanks and comments.
            while pos < bytes.count {
                let b = bytes[pos]
                if b == 0x0A {
                    line += 1
                    pos += 1
                } else if Self.isSpace(b) {
                    pos += 1
                } else if b == UInt8(ascii: "#") {
                    while pos < bytes.count && bytes[pos] != 0x0A { pos += 1 }
                } else {
                    break
                }
            }
            guard pos < bytes.count else { return (.end, line) }
            let start = line
            let b = bytes[pos]
            switch b {
            case UInt8(ascii: "{"), UInt8(ascii: "}"), UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: "="), UInt8(ascii: ","):
                pos += 1
                return (.punct(b), start)
            case UInt8(ascii: "\""), UInt8(ascii: "'"):
                pos += 1
                var out: [UInt8] = []
                while true {
                    guard pos < bytes.count else { throw fail("string opened here is never closed", line: start) }
                    let c = bytes[pos]
                    pos += 1
                    if c == b { break }
                    if c == 0x0A { line += 1 }
                    if c == UInt8(ascii: "\\") {
                        guard pos < bytes.count else { throw fail("string opened here is never closed", line: start) }
                        let e = bytes[pos]
                        pos += 1
                        if e == 0x0A { line += 1 }
                        out.append(e)
                    } else {
                        out.append(c)
                    }
                }
                return (.quoted(String(decoding: out, as: UTF8.self)), start)
            default:
                let s = pos
                while pos < bytes.count && !Self.isSpecial(bytes[pos]) { pos += 1 }
                return (.word(String(decoding: bytes[s..<pos], as: UTF8.self)), start)
            }
        }

        mutating func parseRoot() throws -> LVMConfigSection {
            guard bytes.count <= LVMConfigText.maxBytes else {
                throw fail("text of \(bytes.count) bytes is larger than the \(LVMConfigText.maxBytes)-byte limit", line: 1)
            }
            var root = LVMConfigSection(name: "", line: 1)
            try parseItems(into: &root, depth: 0)
            return root
        }

        /// Items until `}` (depth > 0) or the end of the text (depth 0).
        mutating func parseItems(into section: inout LVMConfigSection, depth: Int) throws {
            while true {
                let (tok, tline) = try next()
                switch tok {
                case .end:
                    if depth > 0 { throw fail("section \"\(section.name)\" opened on line \(section.line) is never closed", line: tline) }
                    return
                case .punct(UInt8(ascii: "}")):
                    if depth == 0 { throw fail("unexpected '}' outside any section", line: tline) }
                    return
                case .word(let name), .quoted(let name):
                    try count(line: tline)
                    let (op, oline) = try next()
                    if op == .punct(UInt8(ascii: "=")) {
                        let value = try parseValue(key: name)
                        section.assignments.append(LVMConfigAssignment(key: name, value: value, line: tline))
                    } else if op == .punct(UInt8(ascii: "{")) {
                        guard depth + 1 <= LVMConfigText.maxDepth else {
                            throw fail("sections nested deeper than \(LVMConfigText.maxDepth)", line: tline)
                        }
                        var sub = LVMConfigSection(name: name, line: tline)
                        try parseItems(into: &sub, depth: depth + 1)
                        section.sections.append(sub)
                    } else {
                        throw fail("expected '=' or '{' after \"\(name)\", found \(describe(op))", line: oline)
                    }
                default:
                    throw fail("expected a name, found \(describe(tok))", line: tline)
                }
            }
        }

        mutating func parseValue(key: String) throws -> LVMConfigValue {
            let (tok, tline) = try next()
            if tok == .punct(UInt8(ascii: "[")) {
                var elements: [LVMConfigValue] = []
                while true {
                    let (t, l) = try next()
                    if t == .punct(UInt8(ascii: "]")) { break }
                    try count(line: l)
                    elements.append(try scalar(t, line: l, key: key))
                    let (sep, sl) = try next()
                    if sep == .punct(UInt8(ascii: "]")) { break }
                    guard sep == .punct(UInt8(ascii: ",")) else {
                        throw fail("expected ',' or ']' in the array \"\(key)\", found \(describe(sep))", line: sl)
                    }
                }
                return .array(elements)
            }
            return try scalar(tok, line: tline, key: key)
        }

        func scalar(_ tok: Token, line: Int, key: String) throws -> LVMConfigValue {
            switch tok {
            case .quoted(let s):
                return .string(s)
            case .word(let w):
                switch Self.number(w) {
                case .some(.some(let n)): return n
                case .some(.none): throw fail("\"\(w.prefix(40))\" (value of \"\(key)\") is not a number in range", line: line)
                case .none: return .string(w)
                }
            default:
                throw fail("expected a value for \"\(key)\", found \(describe(tok))", line: line)
            }
        }

        /// For a word that looks numeric: the integer (Int64) or real value, or `.some(nil)`
        /// when it does not fit; nil for other words.
        static func number(_ w: String) -> LVMConfigValue?? {
            let u = Array(w.utf8)
            var i = 0
            if i < u.count && u[i] == UInt8(ascii: "-") { i += 1 }
            let digitsStart = i
            while i < u.count && u[i] >= 0x30 && u[i] <= 0x39 { i += 1 }
            let intDigits = i - digitsStart
            if i == u.count {
                guard intDigits > 0 else { return nil }
                return .some(Int64(w).map { .integer($0) })
            }
            guard u[i] == UInt8(ascii: ".") else { return nil }
            i += 1
            let frac = i
            while i < u.count && u[i] >= 0x30 && u[i] <= 0x39 { i += 1 }
            guard i == u.count, intDigits + (i - frac) > 0 else { return nil }
            guard let d = Double(w), d.isFinite else { return .some(nil) }
            return .some(.real(d))
        }

        func describe(_ t: Token) -> String {
            switch t {
            case .end: "the end of the text"
            case .punct(let c): "'\(Character(Unicode.Scalar(c)))'"
            case .word(let w): "\"\(w.prefix(40))\""
            case .quoted(let w): "the string \"\(w.prefix(40))\""
            }
        }
    }
}
