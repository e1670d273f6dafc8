package config

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// defaulter is implemented by config structs that have non-zero nydusd
// defaults; the decoder calls it before filling a struct from input.
type defaulter interface{ setDefaults() }

// decodeInto fills the struct pointed to by dst from a generic tree (the
// result of decoding JSON with UseNumber, or TOML), strictly: unknown keys
// and mistyped values fail with an error naming the field path. Field
// names come from `cfg:"name"` tags.
func decodeInto(path string, src any, dst any) error {
	v := reflect.ValueOf(dst)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return fmt.Errorf("config: internal: decode into %T", dst)
	}
	return decodeValue(path, src, v.Elem())
}

func fieldPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func typeName(src any) string {
	switch src.(type) {
	case nil:
		return "null"
	case string:
		return "string"
	case bool:
		return "boolean"
	case json.Number, int64, float64, int, uint64:
		return "number"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	}
	return fmt.Sprintf("%T", src)
}

func decodeValue(path string, src any, v reflect.Value) error {
	if src == nil {
		// JSON null leaves the default in place, as serde does for Option.
		return nil
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		return decodeValue(path, src, v.Elem())
	case reflect.Struct:
		m, ok := src.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: want an object, got %s", path, typeName(src))
		}
		if d, ok := v.Addr().Interface().(defaulter); ok {
			d.setDefaults()
		}
		return decodeStruct(path, m, v)
	case reflect.String:
		s, ok := src.(string)
		if !ok {
			return fmt.Errorf("%s: want a string, got %s", path, typeName(src))
		}
		v.SetString(s)
	case reflect.Bool:
		b, ok := src.(bool)
		if !ok {
			return fmt.Errorf("%s: want a boolean, got %s", path, typeName(src))
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return decodeInt(path, src, v)
	case reflect.Slice:
		arr, ok := src.([]any)
		if !ok {
			return fmt.Errorf("%s: want an array, got %s", path, typeName(src))
		}
		out := reflect.MakeSlice(v.Type(), len(arr), len(arr))
		for i, e := range arr {
			if err := decodeValue(fmt.Sprintf("%s[%d]", path, i), e, out.Index(i)); err != nil {
				return err
			}
		}
		v.Set(out)
	case reflect.Map:
		m, ok := src.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: want an object, got %s", path, typeName(src))
		}
		out := reflect.MakeMapWithSize(v.Type(), len(m))
		for _, k := range sortedKeys(m) {
			e := reflect.New(v.Type().Elem()).Elem()
			if err := decodeValue(fieldPath(path, k), m[k], e); err != nil {
				return err
			}
			out.SetMapIndex(reflect.ValueOf(k), e)
		}
		v.Set(out)
	case reflect.Interface:
		v.Set(reflect.ValueOf(src))
	default:
		return fmt.Errorf("config: internal: %s has unsupported kind %s", path, v.Kind())
	}
	return nil
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func decodeStruct(path string, m map[string]any, v reflect.Value) error {
	t := v.Type()
	fields := make(map[string]int, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		tag := t.Field(i).Tag.Get("cfg")
		if tag == "" || tag == "-" {
			continue
		}
		for _, name := range strings.Split(tag, ",") {
			fields[name] = i
		}
	}
	// Sorted so that the first error is deterministic.
	for _, k := range sortedKeys(m) {
		i, ok := fields[k]
		if !ok {
			return fmt.Errorf("%s: unknown field", fieldPath(path, k))
		}
		if err := decodeValue(fieldPath(path, k), m[k], v.Field(i)); err != nil {
			return err
		}
	}
	return nil
}

func decodeInt(path string, src any, v reflect.Value) error {
	var (
		i   int64
		u   uint64
		neg bool
	)
	switch n := src.(type) {
	case json.Number:
		if x, err := strconv.ParseInt(string(n), 10, 64); err == nil {
			i, neg = x, x < 0
			u = uint64(x)
		} else if x, err := strconv.ParseUint(string(n), 10, 64); err == nil {
			u = x
			i = math.MaxInt64
		} else {
			return fmt.Errorf("%s: want an integer, got %s", path, n)
		}
	case int64:
		i, neg, u = n, n < 0, uint64(n)
	case float64:
		if n != math.Trunc(n) || math.Abs(n) > 1<<53 {
			return fmt.Errorf("%s: want an integer, got %v", path, n)
		}
		i, neg, u = int64(n), n < 0, uint64(int64(n))
	default:
		return fmt.Errorf("%s: want an integer, got %s", path, typeName(src))
	}
	switch v.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if (!neg && u > math.MaxInt64) || v.OverflowInt(i) {
			return fmt.Errorf("%s: %v out of range", path, src)
		}
		v.SetInt(i)
	default:
		if neg || v.OverflowUint(u) {
			return fmt.Errorf("%s: %v out of range", path, src)
		}
		v.SetUint(u)
	}
	return nil
}
