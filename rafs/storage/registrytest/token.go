package registrytest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const (
	tokenService = "rafsd-test-registry"
	tokenIssuer  = "rafsd-test-issuer"
)

// tokenServer is a minimal Docker registry token service: it checks a
// user's password (POST OAuth form or GET with basic auth) and issues an
// ES256 JWT, signed by a key whose self-signed certificate the registry
// trusts, granting the requested scopes.
type tokenServer struct {
	srv            *httptest.Server
	key            *ecdsa.PrivateKey
	der            []byte
	certPath       string
	user, password string
}

func newTokenServer(dir, user, password string) (*tokenServer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: tokenIssuer},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	certPath := filepath.Join(dir, "token-cert.pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	ts := &tokenServer{key: key, der: der, certPath: certPath, user: user, password: password}
	ts.srv = httptest.NewServer(http.HandlerFunc(ts.serve))
	return ts, nil
}

func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	var user, pass string
	var scopes []string
	oauth := r.Method == http.MethodPost
	if oauth {
		r.ParseForm()
		user, pass = r.PostForm.Get("username"), r.PostForm.Get("password")
		scopes = strings.Fields(r.PostForm.Get("scope"))
	} else {
		user, pass, _ = r.BasicAuth()
		scopes = r.URL.Query()["scope"]
	}
	if user != ts.user || pass != ts.password {
		http.Error(w, `{"details":"wrong username or password"}`, http.StatusUnauthorized)
		return
	}
	tok, err := ts.mint(user, scopes)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if oauth {
		json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "expires_in": 300})
	} else {
		json.NewEncoder(w).Encode(map[string]any{"token": tok, "expires_in": 300})
	}
}

// mint issues a token for scopes like "repository:name:pull,push".
func (ts *tokenServer) mint(user string, scopes []string) (string, error) {
	type access struct {
		Type    string   `json:"type"`
		Name    string   `json:"name"`
		Actions []string `json:"actions"`
	}
	var acc []access
	for _, s := range scopes {
		parts := strings.Split(s, ":")
		if len(parts) < 3 {
			continue
		}
		acc = append(acc, access{Type: parts[0], Name: strings.Join(parts[1:len(parts)-1], ":"), Actions: strings.Split(parts[len(parts)-1], ",")})
	}
	now := time.Now()
	hdr, _ := json.Marshal(map[string]any{"typ": "JWT", "alg": "ES256", "x5c": []string{base64.StdEncoding.EncodeToString(ts.der)}})
	claims, _ := json.Marshal(map[string]any{
		"iss": tokenIssuer, "sub": user, "aud": tokenService, "exp": now.Add(5 * time.Minute).Unix(),
		"nbf": now.Add(-time.Minute).Unix(), "iat": now.Unix(), "jti": fmt.Sprint(now.UnixNano()), "access": acc,
	})
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString(hdr) + "." + enc.EncodeToString(claims)
	sum := sha256.Sum256([]byte(signing))
	rr, ss, err := ecdsa.Sign(rand.Reader, ts.key, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	rr.FillBytes(sig[:32])
	ss.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig), nil
}
